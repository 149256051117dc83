//! Binary WebSocket frame layouts (`protocol.py` / `server.py encode_bytes`): big-endian u32 event type,
//! then the payload. Pure functions; knows nothing else.

use super::pyjson;
use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;

/// `PREVIEW_IMAGE`: `[u32 1][u32 format (1 = JPEG, 2 = PNG)][image]`.
pub(crate) fn preview_image(png: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(8 + png.len());
    b.put_u32(1);
    b.put_u32(2);
    b.put_slice(png);
    b.freeze()
}

/// `TEXT`: `[u32 3][u32 node_id_len][node_id][text]`.
pub(crate) fn text(node_id: &str, text: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(8 + node_id.len() + text.len());
    b.put_u32(3);
    b.put_u32(node_id.len() as u32);
    b.put_slice(node_id.as_bytes());
    b.put_slice(text.as_bytes());
    b.freeze()
}

/// `PREVIEW_IMAGE_WITH_METADATA`: `[u32 4][u32 metadata_len][metadata json][image]`.
pub(crate) fn preview_with_metadata(metadata: &Value, png: &[u8]) -> Bytes {
    let meta = pyjson::dumps(metadata);
    let mut b = BytesMut::with_capacity(8 + meta.len() + png.len());
    b.put_u32(4);
    b.put_u32(meta.len() as u32);
    b.put_slice(meta.as_bytes());
    b.put_slice(png);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_frame_matches_c5() {
        let f = text("2", "width: 67, height: 30\n batch size: 2");
        assert_eq!(&f[..9], &[0, 0, 0, 3, 0, 0, 0, 1, b'2']);
        assert_eq!(f.len(), 45);
    }

    #[test]
    fn metadata_frame_header() {
        let f = preview_with_metadata(&serde_json::json!({"node_id": "2"}), b"PNG");
        assert_eq!(&f[..8], &[0, 0, 0, 4, 0, 0, 0, 16]);
        assert_eq!(&f[8..24], br#"{"node_id": "2"}"#);
        assert_eq!(&f[24..], b"PNG");
    }
}
