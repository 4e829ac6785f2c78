//! Every C export goes through the one boundary (`guard` / `guard_or` in src/ffi/guard.rs):
//! the body of each `extern "C" fn` under src/ffi/ must be a single call to one of them.
//! Also checks that a panic inside an export becomes `LOMO_STATUS_PANIC` with a message.

use std::path::Path;

fn exports_in(src: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(pos) = rest.find("extern \"C\" fn ") {
        let after = &rest[pos + "extern \"C\" fn ".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // The body starts at the first '{' after the closing parenthesis of the signature.
        let mut depth = 0i32;
        let mut body_start = None;
        for (i, c) in after.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                '{' if depth == 0 => {
                    body_start = Some(i + 1);
                    break;
                }
                _ => {}
            }
        }
        let body = &after[body_start.expect("export has a body")..];
        let first = body
            .trim_start()
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        out.push((name, first));
        rest = &after[body_start.unwrap()..];
    }
    out
}

#[test]
fn every_export_is_guarded() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ffi");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let src = std::fs::read_to_string(&path).unwrap();
        for (name, first) in exports_in(&src) {
            count += 1;
            assert!(
                first.starts_with("guard(") || first.starts_with("guard_or("),
                "{}: export {name} must start with guard(..) or guard_or(..), starts with {first:?}",
                path.display()
            );
            assert!(
                name.starts_with("lomo_"),
                "export {name} lacks the lomo_ prefix"
            );
        }
    }
    assert!(count >= 15, "found only {count} exports");
}

#[test]
fn a_panic_becomes_a_status() {
    let st = lomo::ffi::guard::guard(|| panic!("boom {}", 42));
    assert_eq!(st, lomo::Status::Panic);
    lomo::ffi::guard::with_last_error(|m| assert!(m.contains("boom 42"), "{m}"));
    let v = lomo::ffi::guard::guard_or(7u32, || panic!("again"));
    assert_eq!(v, 7);
}
