//! An input image's header: its format and declared size, read without decoding a pixel, so a
//! decompression bomb (a small file declaring 20000×20000) is measured at submit, never expanded.
//!
//! Knows nothing of limits or requests: callers compare [`ImageHeader::pixels`] with their bound.

use std::io::Cursor;

/// Memory the reader may use before the pixel data (PNG ancillary chunks such as ICC profiles and text).
const HEADER_ALLOC_LIMIT: u64 = 8 * 1024 * 1024;

/// What an image's header declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// `image/png`, `image/jpeg` or `image/webp`.
    pub mime: &'static str,
    /// The usual file extension: `png`, `jpg` or `webp`.
    pub extension: &'static str,
    /// Declared width in pixels.
    pub width: u32,
    /// Declared height in pixels.
    pub height: u32,
}

impl ImageHeader {
    /// Declared width × height.
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

/// Why an image's header could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ImageHeaderError {
    /// The bytes start with none of the accepted signatures.
    #[error("the bytes are not a PNG, JPEG or WebP image")]
    NotAnImage,
    /// The signature is right but the header is not (a truncated or corrupt file).
    #[error("the bytes start like a {0} image but its header cannot be read (a truncated or corrupt file?)")]
    Corrupt(&'static str),
}

/// Reads the format and declared dimensions of a PNG, JPEG or WebP image from its header only.
///
/// # Errors
/// [`ImageHeaderError::NotAnImage`] for other bytes; [`ImageHeaderError::Corrupt`] when the header after
/// the signature does not parse or declares an empty image.
pub fn read_image_header(data: &[u8]) -> Result<ImageHeader, ImageHeaderError> {
    let (format, name, mime, extension) = match image::guess_format(data) {
        Ok(image::ImageFormat::Png) => (image::ImageFormat::Png, "PNG", "image/png", "png"),
        Ok(image::ImageFormat::Jpeg) => (image::ImageFormat::Jpeg, "JPEG", "image/jpeg", "jpg"),
        Ok(image::ImageFormat::WebP) => (image::ImageFormat::WebP, "WebP", "image/webp", "webp"),
        _ => return Err(ImageHeaderError::NotAnImage),
    };
    let mut reader = image::ImageReader::with_format(Cursor::new(data), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(HEADER_ALLOC_LIMIT);
    reader.limits(limits);
    match reader.into_dimensions() {
        Ok((width, height)) if width > 0 && height > 0 => Ok(ImageHeader { mime, extension, width, height }),
        _ => Err(ImageHeaderError::Corrupt(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image::RgbImage::new(w, h)
            .write_to(&mut out, image::ImageFormat::Png)
            .unwrap_or_else(|e| panic!("{e}"));
        out.into_inner()
    }

    #[test]
    fn reads_the_declared_size_of_each_format() {
        let h = read_image_header(&png(3, 2)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((h.mime, h.width, h.height, h.pixels()), ("image/png", 3, 2, 6));
        let mut jpeg = Cursor::new(Vec::new());
        image::RgbImage::new(5, 4)
            .write_to(&mut jpeg, image::ImageFormat::Jpeg)
            .unwrap_or_else(|e| panic!("{e}"));
        let h = read_image_header(jpeg.get_ref()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((h.extension, h.width, h.height), ("jpg", 5, 4));
    }

    #[test]
    fn a_signature_followed_by_junk_is_corrupt() {
        let mut junk = b"\x89PNG\r\n\x1a\n".to_vec();
        junk.extend_from_slice(&[0x42; 64]);
        assert_eq!(read_image_header(&junk), Err(ImageHeaderError::Corrupt("PNG")));
        assert_eq!(read_image_header(b"GIF89a...."), Err(ImageHeaderError::NotAnImage));
        let truncated = &png(8, 8)[..20];
        assert_eq!(read_image_header(truncated), Err(ImageHeaderError::Corrupt("PNG")));
    }
}
