//! `connect --mode message` framing on stdin (`lines` and `u32be`): reading arbitrary
//! input yields messages within the limit or a clean error, never a panic or a message
//! over the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipebridge::endpoint::message::{MsgError, MsgReader};

const MAX: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(async {
        for lines in [true, false] {
            let input: pipebridge::endpoint::BoxRead = Box::new(std::io::Cursor::new(data.to_vec()));
            let mut r = if lines {
                MsgReader::Lines { input: tokio::io::BufReader::new(input), max: MAX }
            } else {
                MsgReader::U32be { input, max: MAX }
            };
            for _ in 0..=data.len() {
                match r.recv().await {
                    Ok(Some(m)) => assert!(m.len() <= MAX),
                    Ok(None) | Err(MsgError::TooBig { .. }) | Err(MsgError::Io(_)) => break,
                }
            }
        }
    });
});
