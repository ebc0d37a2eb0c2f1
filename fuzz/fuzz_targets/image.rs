//! Image bytes (PNG, JPEG, WebP, anything) and data URLs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = kiln::data::images::decode_rgb(data) {
        assert!(img.width() > 0 && img.height() > 0);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(bytes) = kiln::data::images::decode_data_url(text)
    {
        let _ = kiln::data::images::decode_rgb(&bytes);
    }
});
