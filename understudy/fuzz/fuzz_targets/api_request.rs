//! `cargo fuzz run api_request`: a request line of the admin API, as `node::api::serve` reads it.
//!
//! Whatever parses must write back to JSON that parses again and writes the same; a line that
//! does not parse gets an error that says so.
#![no_main]

use node::api;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // `serve` reads lines as UTF-8 text: other bytes end the connection before parsing.
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    match api::parse_request(line) {
        Ok(request) => {
            let json = serde_json::to_string(&request).expect("a request writes as json");
            let again = api::parse_request(&json).expect("a written request parses");
            assert_eq!(serde_json::to_string(&again).expect("writes"), json, "request does not round-trip");
        }
        Err(e) => assert!(e.to_string().starts_with("bad api request: "), "{e}"),
    }
});
