//! Image signature and header checks for downloads: which format a byte stream is (PNG, JPEG, WebP by
//! magic bytes) and its width/height, read from the first bytes while the rest streams past.
//!
//! Pure, incremental; no I/O. Knows nothing about HTTP.

use std::io::Cursor;

use image::{ImageFormat, ImageReader};

/// How much of the head of a file is kept to read its dimensions (JPEG's SOF can follow large EXIF
/// blocks; PNG/WebP headers are within the first few dozen bytes).
const HEAD_MAX: usize = 1 << 20;
/// Bytes needed to recognise every supported signature (`RIFF....WEBP`).
pub(crate) const SIGNATURE_LEN: usize = 12;

/// Recognises a supported image signature.
pub(crate) fn format_of(head: &[u8]) -> Option<(ImageFormat, &'static str)> {
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some((ImageFormat::Png, "image/png"))
    } else if head.starts_with(&[0xff, 0xd8, 0xff]) {
        Some((ImageFormat::Jpeg, "image/jpeg"))
    } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
        Some((ImageFormat::WebP, "image/webp"))
    } else {
        None
    }
}

/// Incremental sniffer: feed every chunk; ask for the result at the end.
#[derive(Debug, Default)]
pub(crate) struct Sniffer {
    head: Vec<u8>,
    format: Option<(ImageFormat, &'static str)>,
    dims: Option<(u32, u32)>,
}

impl Sniffer {
    /// Bytes kept so far (tests).
    #[cfg(test)]
    pub(crate) fn head_len(&self) -> usize {
        self.head.len()
    }

    /// Checks the signature once [`SIGNATURE_LEN`] bytes (or the whole file) are in.
    pub(crate) fn check_signature(&mut self) -> Result<&'static str, String> {
        match format_of(&self.head) {
            Some(f) => {
                self.format = Some(f);
                Ok(f.1)
            }
            None => Err(format!(
                "unrecognised signature {}",
                hex::encode(&self.head[..self.head.len().min(SIGNATURE_LEN)])
            )),
        }
    }

    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        if self.dims.is_some() || self.head.len() >= HEAD_MAX {
            return;
        }
        let take = chunk.len().min(HEAD_MAX - self.head.len());
        self.head.extend_from_slice(&chunk[..take]);
        if self.format.is_some() {
            self.try_dims();
        }
    }

    fn try_dims(&mut self) {
        if let Some((fmt, _)) = self.format {
            let reader = ImageReader::with_format(Cursor::new(&self.head[..]), fmt);
            if let Ok(d) = reader.into_dimensions() {
                self.dims = Some(d);
            }
        }
    }

    /// The mime type and dimensions, once the whole stream was fed.
    pub(crate) fn finish(mut self) -> Result<(&'static str, u32, u32), String> {
        let mime = match self.format {
            Some((_, m)) => m,
            None => self.check_signature()?,
        };
        if self.dims.is_none() {
            self.try_dims();
        }
        let (w, h) =
            self.dims.ok_or_else(|| "cannot read the image dimensions from its header".to_owned())?;
        Ok((mime, w, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(fmt: ImageFormat, w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 200, 30]));
        let mut out = Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img).write_to(&mut out, fmt).unwrap();
        out.into_inner()
    }

    #[test]
    fn sniffs_png_jpeg_webp_in_small_chunks() {
        for (fmt, mime) in [
            (ImageFormat::Png, "image/png"),
            (ImageFormat::Jpeg, "image/jpeg"),
            (ImageFormat::WebP, "image/webp"),
        ] {
            let bytes = encode(fmt, 37, 21);
            let mut s = Sniffer::default();
            let mut checked = false;
            for chunk in bytes.chunks(5) {
                s.feed(chunk);
                if !checked && s.head_len() >= SIGNATURE_LEN {
                    assert_eq!(s.check_signature().unwrap(), mime);
                    checked = true;
                }
            }
            assert_eq!(s.finish().unwrap(), (mime, 37, 21));
        }
    }

    #[test]
    fn rejects_non_images_and_truncated_headers() {
        let mut s = Sniffer::default();
        s.feed(b"<html>not an image</html>");
        assert!(s.check_signature().is_err());
        let png = encode(ImageFormat::Png, 4, 4);
        let mut s = Sniffer::default();
        s.feed(&png[..14]);
        assert!(s.check_signature().is_ok());
        assert!(s.finish().is_err());
    }
}
