//! The request line, headers, pipe name and query of a session request: parsed as HTTP
//! (httparse, like hyper) and run through the gateway's pre-authentication checks, which
//! must answer with a refusal or a precheck, never panic, and never accept a name that
//! could touch the filesystem.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else {
        return;
    };
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return;
    };
    let mut b = hyper::Request::builder().method(method).uri(path);
    for h in req.headers.iter() {
        b = b.header(h.name, h.value);
    }
    let Ok(request) = b.body(()) else {
        return;
    };
    let p = request.uri().path().to_string();
    if let Some(name) = p.strip_prefix("/pipes/") {
        if pipebridge::server::precheck(&request, name).is_ok() {
            assert!(pipebridge::config::valid_name(name));
            assert!(!name.contains('/') && !name.contains('%') && name != ".." && !name.starts_with('.'));
        }
    }
});
