//! The config parser: any text yields a config or errors that name the file, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errs) = pipebridge::config::Config::parse(std::path::Path::new("fuzz.toml"), text) {
        assert!(!errs.0.is_empty());
        for e in &errs.0 {
            assert!(e.to_string().starts_with("fuzz.toml"));
        }
    }
});
