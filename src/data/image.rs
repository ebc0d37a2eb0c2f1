//! Image checks shared by the JSONL `image` field and zip uploads: magic-byte
//! sniffing, `data:` URL decoding and relative-path sanity.

use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::{DecodeError, DecodeSliceError, Engine, alphabet};

/// Image encodings the trainer accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// PNG (`\x89PNG\r\n\x1a\n`).
    Png,
    /// JPEG (`FF D8 FF`).
    Jpeg,
    /// WebP (`RIFF....WEBP`).
    Webp,
}

/// Bytes needed by [`ImageKind::sniff`]; zip validation reads no more than this.
pub const SNIFF_LEN: usize = 16;

/// File extensions (lower-case, no dot) recognised as images.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

impl ImageKind {
    /// Identifies an image from its first bytes; `None` when it is not PNG, JPEG or WebP.
    pub fn sniff(head: &[u8]) -> Option<ImageKind> {
        if head.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(ImageKind::Png)
        } else if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageKind::Jpeg)
        } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
            Some(ImageKind::Webp)
        } else {
            None
        }
    }

    /// Maps a MIME type (case-insensitive) to a kind; `image/jpg` is tolerated
    /// because some encoders emit it.
    pub fn from_mime(mime: &str) -> Option<ImageKind> {
        match mime.to_ascii_lowercase().as_str() {
            "image/png" => Some(ImageKind::Png),
            "image/jpeg" | "image/jpg" => Some(ImageKind::Jpeg),
            "image/webp" => Some(ImageKind::Webp),
            _ => None,
        }
    }

    /// Human name used in problem messages.
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Png => "PNG",
            ImageKind::Jpeg => "JPEG",
            ImageKind::Webp => "WebP",
        }
    }
}

/// Lower-cased extension of the last path component, if any.
pub(crate) fn extension(name: &str) -> Option<String> {
    let last = name.rsplit(['/', '\\']).next().unwrap_or(name);
    match last.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() && !ext.is_empty() => Some(ext.to_ascii_lowercase()),
        _ => None,
    }
}

/// True when the name ends in a supported image extension.
pub(crate) fn has_image_extension(name: &str) -> bool {
    extension(name).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

/// Describes an unsupported extension for a problem message.
pub(crate) fn unsupported_extension_message(name: &str) -> String {
    match extension(name) {
        Some(ext) => format!("unsupported file type \".{ext}\" (expected png, jpg, jpeg or webp)"),
        None => "unsupported file type (no extension; expected png, jpg, jpeg or webp)".to_string(),
    }
}

/// True for names that are absolute on Unix or Windows (`/x`, `\x`, `C:...`).
pub(crate) fn is_absolute(name: &str) -> bool {
    let b = name.as_bytes();
    name.starts_with(['/', '\\']) || (b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':')
}

/// True when any `/`- or `\`-separated component is `..`.
pub(crate) fn has_parent_component(name: &str) -> bool {
    name.split(['/', '\\']).any(|c| c == "..")
}

/// Checks an image reference that is a path inside a separately uploaded zip.
pub(crate) fn check_image_path(path: &str) -> Result<(), String> {
    if path.trim().is_empty() {
        return Err("\"image\" is empty".to_string());
    }
    if path.contains("://") {
        // The server cannot fetch remote images; say so rather than "bad path".
        return Err(format!(
            "\"image\": remote URLs are not supported ({path:?}); use a data URL or a path inside the image zip"
        ));
    }
    if is_absolute(path) {
        return Err(format!(
            "\"image\": absolute paths are not allowed ({path:?})"
        ));
    }
    if has_parent_component(path) {
        return Err(format!(
            "\"image\": \"..\" is not allowed in paths ({path:?})"
        ));
    }
    if !has_image_extension(path) {
        return Err(format!(
            "\"image\": {}",
            unsupported_extension_message(path)
        ));
    }
    Ok(())
}

/// Base64 chunk size in characters; a multiple of 4 so chunks decode independently.
const B64_CHUNK: usize = 64 * 1024;

/// Standard alphabet, padding optional: encoders disagree about trailing `=`.
pub(crate) const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Validates a `data:image/...;base64,...` URL: supported MIME type, valid base64,
/// and decoded bytes whose header matches the declared type.
pub(crate) fn check_data_url(url: &str) -> Result<ImageKind, String> {
    let rest = url.get(5..).unwrap_or_default(); // caller guarantees the "data:" prefix
    let Some((meta, payload)) = rest.split_once(',') else {
        return Err("\"image\": malformed data URL (no comma)".to_string());
    };
    let mut parts = meta.split(';');
    let mime = parts.next().unwrap_or_default();
    let is_base64 = parts.any(|p| p.eq_ignore_ascii_case("base64"));
    let Some(declared) = ImageKind::from_mime(mime) else {
        return Err(format!(
            "\"image\": unsupported image type {mime:?} (expected image/png, image/jpeg or image/webp)"
        ));
    };
    if !is_base64 {
        return Err("\"image\": data URL must be base64-encoded (\";base64,\")".to_string());
    }
    let head = decode_base64_head(payload.as_bytes())?;
    if head.is_empty() {
        return Err("\"image\": the image data is empty".to_string());
    }
    match ImageKind::sniff(&head) {
        Some(actual) if actual == declared => Ok(actual),
        Some(actual) => Err(format!(
            "\"image\": the data is {} but the data URL says {mime}",
            actual.name()
        )),
        None => Err(format!(
            "\"image\": the data is not a {} image (unrecognised header)",
            declared.name()
        )),
    }
}

/// Decodes all of `payload` to prove it is valid base64, in fixed-size chunks so a
/// 64 MiB line never needs a second 48 MiB buffer; returns the first decoded bytes.
fn decode_base64_head(payload: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; B64_CHUNK / 4 * 3];
    let mut head = Vec::new();
    for (n, chunk) in payload.chunks(B64_CHUNK).enumerate() {
        let base = n * B64_CHUNK;
        let written = B64.decode_slice(chunk, &mut out).map_err(|e| {
            let e = match e {
                DecodeSliceError::DecodeError(e) => e,
                // Cannot happen: `out` fits a full chunk; report rather than panic.
                DecodeSliceError::OutputSliceTooSmall => {
                    return "\"image\": internal base64 buffer too small".to_string();
                }
            };
            let e = match e {
                DecodeError::InvalidByte(o, b) => DecodeError::InvalidByte(o + base, b),
                DecodeError::InvalidLastSymbol(o, b) => DecodeError::InvalidLastSymbol(o + base, b),
                DecodeError::InvalidLength(l) => DecodeError::InvalidLength(l + base),
                DecodeError::InvalidPadding => DecodeError::InvalidPadding,
            };
            format!("\"image\": invalid base64 data: {e}")
        })?;
        if head.len() < SNIFF_LEN {
            let take = (SNIFF_LEN - head.len()).min(written);
            head.extend_from_slice(&out[..take]);
        }
    }
    Ok(head)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    /// Minimal headers that pass sniffing; tests elsewhere reuse them.
    pub(crate) const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
    pub(crate) const JPEG: &[u8] = &[0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10, b'J', b'F', b'I', b'F', 0];
    pub(crate) const WEBP: &[u8] = b"RIFF\x24\0\0\0WEBPVP8 ";

    pub(crate) fn data_url(mime: &str, bytes: &[u8]) -> String {
        format!("data:{mime};base64,{}", STANDARD.encode(bytes))
    }

    #[test]
    fn sniffs_supported_formats() {
        assert_eq!(ImageKind::sniff(PNG), Some(ImageKind::Png));
        assert_eq!(ImageKind::sniff(JPEG), Some(ImageKind::Jpeg));
        assert_eq!(ImageKind::sniff(WEBP), Some(ImageKind::Webp));
        assert_eq!(ImageKind::sniff(b"GIF89a"), None);
        assert_eq!(ImageKind::sniff(b"RIFF\0\0\0\0WAVE"), None);
        assert_eq!(ImageKind::sniff(b""), None);
    }

    #[test]
    fn data_urls() {
        assert_eq!(
            check_data_url(&data_url("image/png", PNG)),
            Ok(ImageKind::Png)
        );
        assert_eq!(
            check_data_url(&data_url("image/jpeg", JPEG)),
            Ok(ImageKind::Jpeg)
        );
        assert_eq!(
            check_data_url(&data_url("image/webp", WEBP)),
            Ok(ImageKind::Webp)
        );
        // Unpadded base64 is accepted.
        let unpadded = data_url("image/png", PNG).trim_end_matches('=').to_string();
        assert_eq!(check_data_url(&unpadded), Ok(ImageKind::Png));

        let err = check_data_url(&data_url("image/gif", b"GIF89a")).unwrap_err();
        assert!(
            err.contains("unsupported image type \"image/gif\""),
            "{err}"
        );
        let err = check_data_url(&data_url("image/png", JPEG)).unwrap_err();
        assert!(
            err.contains("the data is JPEG but the data URL says image/png"),
            "{err}"
        );
        let err = check_data_url(&data_url("image/png", b"hello world!")).unwrap_err();
        assert!(err.contains("not a PNG image"), "{err}");
        let err = check_data_url("data:image/png;base64,!!!!").unwrap_err();
        assert!(err.contains("invalid base64"), "{err}");
        let err = check_data_url("data:image/png,abc").unwrap_err();
        assert!(err.contains("must be base64-encoded"), "{err}");
        let err = check_data_url("data:image/png;base64").unwrap_err();
        assert!(err.contains("no comma"), "{err}");
        let err = check_data_url("data:image/png;base64,").unwrap_err();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn base64_errors_report_absolute_offsets_across_chunks() {
        let mut payload = STANDARD.encode(vec![7u8; B64_CHUNK]); // > one chunk of chars
        let bad_at = B64_CHUNK + 8;
        payload.replace_range(bad_at..bad_at + 1, "*");
        let err = decode_base64_head(payload.as_bytes()).unwrap_err();
        assert!(err.contains(&format!("offset {bad_at}")), "{err}");
        let ok = STANDARD.encode([PNG, &[0u8; 100_000][..]].concat());
        assert_eq!(
            decode_base64_head(ok.as_bytes()).unwrap(),
            PNG[..SNIFF_LEN].to_vec()
        );
    }

    #[test]
    fn image_paths() {
        assert!(check_image_path("cats/1.png").is_ok());
        assert!(check_image_path("a.JPEG").is_ok());
        assert!(
            check_image_path("/etc/passwd.png")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            check_image_path("C:\\x.png")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            check_image_path("\\\\server\\x.png")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            check_image_path("a/../../x.png")
                .unwrap_err()
                .contains("..")
        );
        assert!(check_image_path("a\\..\\x.png").unwrap_err().contains(".."));
        assert!(
            check_image_path("https://x/y.png")
                .unwrap_err()
                .contains("remote")
        );
        assert!(check_image_path("a.gif").unwrap_err().contains("\".gif\""));
        assert!(
            check_image_path("noext")
                .unwrap_err()
                .contains("no extension")
        );
        assert!(check_image_path(" ").unwrap_err().contains("empty"));
    }

    #[test]
    fn extensions() {
        assert_eq!(extension("a/b.PNG").as_deref(), Some("png"));
        assert_eq!(extension("a/.hidden"), None);
        assert_eq!(extension("a.d/b"), None);
        assert!(has_image_extension("x\\y.webp"));
    }
}
