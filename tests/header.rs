//! The committed `include/lomo.h` is what cbindgen generates from the sources.
//! Regenerate with `LOMO_BLESS=1 cargo test --test header`.

use std::path::Path;

#[test]
fn header_is_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(root)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let path = root.join("include/lomo.h");
    if std::env::var_os("LOMO_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/lomo.h is stale: run `LOMO_BLESS=1 cargo test --test header` and commit it"
    );
}

#[test]
fn header_version_matches_cargo() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = std::fs::read_to_string(root.join("include/lomo.h")).unwrap();
    let v = env!("CARGO_PKG_VERSION");
    let parts: Vec<&str> = v.split('.').collect();
    assert!(header.contains(&format!("#define LOMO_VERSION_STRING \"{v}\"")));
    assert!(header.contains(&format!("#define LOMO_VERSION_MAJOR {}", parts[0])));
    assert!(header.contains(&format!("#define LOMO_VERSION_MINOR {}", parts[1])));
    assert!(header.contains(&format!("#define LOMO_VERSION_PATCH {}", parts[2])));
}
