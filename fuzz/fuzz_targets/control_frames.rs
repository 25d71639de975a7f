//! Control (text) frames a peer sends after the upgrade: decoding never panics, and what
//! decodes re-encodes to something that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipebridge::tunnel::protocol::Control;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = Control::decode(text) {
        let again = Control::decode(&c.encode()).expect("re-encoded control decodes");
        assert_eq!(again, c);
    }
});
