//! The freshly built liblomo.so for the tests that compile C and C++ programs against it.

use std::path::{Path, PathBuf};

/// The SONAME build.rs gives the library: `liblomo.so.0.<minor>` while the version is 0.x,
/// else `liblomo.so.<major>`.
pub fn soname() -> String {
    let (major, minor) = (
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR"),
    );
    if major == "0" {
        format!("liblomo.so.0.{minor}")
    } else {
        format!("liblomo.so.{major}")
    }
}

/// target/<profile>/deps/, where cargo built liblomo.so alongside this test, with the link
/// `<soname> -> liblomo.so` that a program linked with `-llomo` asks the loader for (what
/// scripts/install.sh installs; cargo makes only liblomo.so).
pub fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let lib = exe.parent().unwrap().to_path_buf();
    assert!(
        lib.join("liblomo.so").exists(),
        "liblomo.so not found in {}",
        lib.display()
    );
    link_soname(&lib);
    lib
}

fn link_soname(lib: &Path) {
    let link = lib.join(soname());
    if std::fs::read_link(&link).is_ok_and(|t| t == Path::new("liblomo.so")) {
        return;
    }
    let _ = std::fs::remove_file(&link);
    // Tests run in parallel: another one may have made it in between.
    if let Err(e) = std::os::unix::fs::symlink("liblomo.so", &link) {
        assert!(
            e.kind() == std::io::ErrorKind::AlreadyExists,
            "linking {}: {e}",
            link.display()
        );
    }
}
