//! Fault injection (issue 14, item 4): checkpoint saves that fail part-way (disk full through
//! the library's injected write error, and on a real 64 KiB tmpfs where the machine lets the
//! test mount one; a read-only directory or filesystem; a blocked temporary file) leave the
//! previous file intact and the optimizer usable; files of a newer format version or of another
//! byte order are refused with a message; an allocation failure at any point of a state call
//! leaves the optimizer as it was (registration: `tests/out_of_memory.rs`).

mod common;
#[path = "state_common/mod.rs"]
mod state_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use lomo::Status;
use state_common::*;

/// An AdaLomo optimizer whose checkpoint is about 40 KB (a 10 000-element vector state), trained
/// for `steps` steps; its buffers live as long as it.
struct Trained {
    opt: Opt,
    ids: Vec<u32>,
    _bufs: Vec<Buf>,
    grads: Vec<Buf>,
}

fn trained(steps: usize) -> Trained {
    trained_on(steps, -1)
}

/// [`trained`] with the parameters on `device` (-1: CPU; 0: the emulated CUDA device, whose
/// memory is host memory).
fn trained_on(steps: usize, device: i32) -> Trained {
    let opt = Opt::new(&config(ADALOMO)).unwrap();
    let shapes: [&[i64]; 2] = [&[10_000], &[20, 30]];
    let mut rng = Rng::new(7);
    let (mut ids, mut bufs, mut grads) = (vec![], vec![], vec![]);
    for (i, shape) in shapes.iter().enumerate() {
        let n = shape.iter().product::<i64>() as usize;
        let mut b = Buf::new(F32, &(0..n).map(|_| rng.uniform()).collect::<Vec<_>>());
        let name = format!("p{i}");
        ids.push(
            opt.register_on(&name, b.ptr(), F32, shape, device, 0, 0)
                .unwrap(),
        );
        bufs.push(b);
        grads.push(Buf::new(
            F32,
            &(0..n).map(|_| rng.uniform()).collect::<Vec<_>>(),
        ));
    }
    let t = Trained {
        opt,
        ids,
        _bufs: bufs,
        grads,
    };
    t.train(steps);
    t
}

impl Trained {
    fn train(&self, steps: usize) {
        for _ in 0..steps {
            self.opt.begin(UPDATE, 1e-3).unwrap();
            for (id, g) in self.ids.iter().zip(&self.grads) {
                self.opt.submit(*id, g.f32s.as_ptr().cast(), F32).unwrap();
            }
            self.opt.end().unwrap();
        }
    }
}

/// Files in `dir` other than `keep` (a failed save must leave no temporary file behind).
fn strays(dir: &Path, keep: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p != keep)
        .collect()
}

/// After a failed save: the old file is byte for byte the old checkpoint, nothing else is in
/// the directory, and the optimizer is unchanged and still saves, loads and trains.
fn check_after_failed_save(t: &Trained, dir: &Path, path: &Path, old: &[u8], state: &[u8]) {
    assert_eq!(
        std::fs::read(path).unwrap(),
        old,
        "the previous file is intact"
    );
    assert_eq!(
        strays(dir, path),
        Vec::<PathBuf>::new(),
        "no temporary file is left"
    );
    assert_eq!(state_bytes(&t.opt), state, "the optimizer is unchanged");
    load(&t.opt, path).unwrap();
    t.train(1);
}

#[test]
fn save_failing_part_way_leaves_the_previous_file_intact() {
    let t = trained(2);
    let dir = tmpdir("fault_write");
    let path = dir.join("opt.safetensors");
    save(&t.opt, &path).unwrap();
    let old = std::fs::read(&path).unwrap();
    t.train(1);
    let state = state_bytes(&t.opt);
    let size = state.len() as u64;
    assert!(size > 40_000, "{size}");
    for at in [0, 1, 8, 100, 4096, 16_384, size / 2, size - 8, size - 1] {
        lomo::state::fail_write_after(Some(at));
        let err = save(&t.opt, &path).expect_err(&format!("a write failing after {at} bytes"));
        lomo::state::fail_write_after(None);
        assert_eq!(err.status, Status::IoError as u32, "{err:?}");
        assert!(err.message.contains("No space left"), "{}", err.message);
        check_after_failed_save(&t, &dir, &path, &old, &state);
        // Back to the saved position for the next round (the check trained one step).
        load(&t.opt, &path).unwrap();
        load_bytes(&t.opt, &state).unwrap();
    }
    // Once the disk has room again, the save goes through.
    save(&t.opt, &path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), state);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_that_cannot_create_its_temporary_file_leaves_the_previous_file_intact() {
    let t = trained(1);
    let dir = tmpdir("fault_tmp");
    let path = dir.join("opt.safetensors");
    save(&t.opt, &path).unwrap();
    let old = std::fs::read(&path).unwrap();
    t.train(1);
    let state = state_bytes(&t.opt);
    // A directory where the temporary file goes: creating it fails, even for root.
    let tmp = dir.join(format!("opt.safetensors.tmp.{}", std::process::id()));
    std::fs::create_dir(&tmp).unwrap();
    let err = save(&t.opt, &path).unwrap_err();
    assert_eq!(err.status, Status::IoError as u32, "{err:?}");
    assert!(err.message.contains("cannot create"), "{}", err.message);
    std::fs::remove_dir(&tmp).unwrap();
    check_after_failed_save(&t, &dir, &path, &old, &state);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_into_a_read_only_directory_fails_and_changes_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let t = trained(1);
    let dir = tmpdir("fault_ro");
    let path = dir.join("opt.safetensors");
    save(&t.opt, &path).unwrap();
    let old = std::fs::read(&path).unwrap();
    t.train(1);
    let state = state_bytes(&t.opt);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    // Root ignores permission bits (CAP_DAC_OVERRIDE): then only the mounted check below holds.
    let enforced = std::fs::File::create(dir.join("probe")).is_err();
    if enforced {
        let err = save(&t.opt, &path).unwrap_err();
        assert_eq!(err.status, Status::IoError as u32, "{err:?}");
        assert!(err.message.contains("Permission denied"), "{}", err.message);
    } else {
        std::fs::remove_file(dir.join("probe")).unwrap();
        eprintln!("note: permission bits are not enforced for this user (root)");
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    if enforced {
        check_after_failed_save(&t, &dir, &path, &old, &state);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A small tmpfs mounted for the test and unmounted on drop (None where the machine does not
/// let the test mount one: not root, no mount namespace privileges).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(tag: &str, size: &str) -> Option<Tmpfs> {
        let dir = tmpdir(tag);
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("note: cannot mount a tmpfs here; the injected-error tests cover disk full");
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(Tmpfs(dir))
    }

    fn remount(&self, opts: &str) {
        let s = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(s.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn save_on_a_full_or_read_only_filesystem_leaves_the_previous_file_intact() {
    let Some(fs) = Tmpfs::mount("fault_tmpfs", "64k") else {
        return;
    };
    let t = trained(1);
    let path = fs.0.join("opt.safetensors");
    // The first checkpoint (about 40 KB) fits; a second copy next to it does not.
    save(&t.opt, &path).unwrap();
    let old = std::fs::read(&path).unwrap();
    t.train(1);
    let state = state_bytes(&t.opt);
    let err = save(&t.opt, &path).unwrap_err();
    assert_eq!(err.status, Status::IoError as u32, "{err:?}");
    assert!(err.message.contains("No space left"), "{}", err.message);
    check_after_failed_save(&t, &fs.0, &path, &old, &state);
    load_bytes(&t.opt, &state).unwrap();

    fs.remount("ro");
    let err = save(&t.opt, &path).unwrap_err();
    assert_eq!(err.status, Status::IoError as u32, "{err:?}");
    assert!(
        err.message.contains("Read-only file system"),
        "{}",
        err.message
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        old,
        "the previous file is intact"
    );
    assert_eq!(strays(&fs.0, &path), Vec::<PathBuf>::new());
    assert_eq!(state_bytes(&t.opt), state, "the optimizer is unchanged");
    t.train(1);
    fs.remount("rw");
}

#[test]
fn files_of_a_newer_format_or_another_byte_order_are_refused_with_a_message() {
    let (ckpt, case) = small_fixture();
    // Newer format version.
    let key = b"\"format_version\":\"1\"";
    let i = ckpt.windows(key.len()).position(|w| w == key).unwrap() + key.len() - 2;
    let mut newer = ckpt.clone();
    newer[i] = b'2';
    refuses(
        &case,
        &newer,
        "checkpoint format version 2 is not supported",
    );
    // Big-endian header length (how another byte order shows in a safetensors file).
    let mut swapped = ckpt.clone();
    let n = u64::from_le_bytes(ckpt[..8].try_into().unwrap());
    swapped[..8].copy_from_slice(&n.to_be_bytes());
    refuses(&case, &swapped, "big-endian byte order");
    // A file that says its numbers are big-endian (same header length: spaces pad the JSON).
    let key = b"\"byte_order\":\"little\"";
    let i = ckpt.windows(key.len()).position(|w| w == key).unwrap();
    let n = n as usize;
    let mut header = ckpt[8..8 + n].to_vec();
    header.splice(
        i - 8..i - 8 + key.len(),
        b"\"byte_order\":\"big\"".iter().copied(),
    );
    header.extend_from_slice(b"   ");
    let mut big = ckpt[..8].to_vec();
    big.extend_from_slice(&header);
    big.extend_from_slice(&ckpt[8 + n..]);
    assert_eq!(big.len(), ckpt.len());
    refuses(&case, &big, "byte order 'big'");
    // Files written before the byte_order key existed are little-endian and still load.
    let mut m = Model::init(&case);
    let (opt, _) = optimizer_on(&case, &case.cfg, &mut m, &natural(&case), -1);
    load_bytes(&opt, &without_byte_order(&ckpt)).unwrap();
    assert_eq!(state_bytes(&opt), ckpt);
}

/// `ckpt` as a library without the `byte_order` key wrote it: the key removed, the checksum
/// recomputed as the README's "Checkpoints" section defines it.
fn without_byte_order(ckpt: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(ckpt[..8].try_into().unwrap()) as usize;
    let data = &ckpt[8 + n..];
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&ckpt[8..8 + n]).unwrap();
    let meta = header["__metadata__"].as_object_mut().unwrap();
    assert!(meta.remove("byte_order").is_some());
    meta.remove("checksum");
    let mut crc = lomo::state::Crc32::new();
    let entry = |crc: &mut lomo::state::Crc32, k: &str, v: &str| {
        for s in [k, v] {
            crc.update(&(s.len() as u64).to_le_bytes());
            crc.update(s.as_bytes());
        }
    };
    let mut keys: Vec<&String> = meta.keys().collect();
    keys.sort();
    for k in keys {
        entry(&mut crc, k, meta[k].as_str().unwrap());
    }
    let mut tensors: Vec<(&String, &serde_json::Value)> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .collect();
    tensors.sort_by_key(|(_, t)| t["data_offsets"][0].as_u64().unwrap());
    for (name, t) in tensors {
        entry(&mut crc, name, t["dtype"].as_str().unwrap());
        let shape = t["shape"].as_array().unwrap();
        crc.update(&(shape.len() as u64).to_le_bytes());
        let offsets = t["data_offsets"].as_array().unwrap();
        for d in shape.iter().chain(offsets) {
            crc.update(&d.as_u64().unwrap().to_le_bytes());
        }
    }
    crc.update(data);
    let sum = format!("{:08x}", crc.finish());
    header["__metadata__"]
        .as_object_mut()
        .unwrap()
        .insert("checksum".into(), sum.into());
    let mut json = serde_json::to_string(&header).unwrap();
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Fails each fallible allocation of `call` in turn: each failure is OUT_OF_MEMORY and leaves
/// the optimizer's state as it was; the call then succeeds.
fn each_allocation_fails(
    t: &Trained,
    what: &str,
    min_allocs: usize,
    call: impl Fn() -> Result<(), Failure>,
) {
    let before = state_bytes(&t.opt);
    let mut k = 0;
    loop {
        lomo::alloc::fail_after(Some(k as u64));
        let r = call();
        lomo::alloc::fail_after(None);
        match r {
            Ok(()) => break,
            Err(e) => {
                assert_eq!(e.status, Status::OutOfMemory as u32, "{what}: {e:?}");
                assert!(e.message.contains(" bytes for "), "{}", e.message);
                assert_eq!(state_bytes(&t.opt), before, "{what}: allocation {k}");
            }
        }
        k += 1;
        assert!(k < 100, "{what}: a handful of allocations");
    }
    assert!(
        k >= min_allocs,
        "{what}: {k} allocations, expected {min_allocs} or more"
    );
}

#[test]
fn allocation_failure_in_state_calls_changes_nothing() {
    std::env::set_var("LOMO_CUDA_EMULATE", "1");
    // The emulated CUDA device (0) exists with the test-only feature "cuda-emulation".
    let devices: &[i32] = if cfg!(feature = "cuda-emulation") {
        &[-1, 0]
    } else {
        &[-1]
    };
    for &device in devices {
        let t = trained_on(2, device);
        let dir = tmpdir("fault_alloc");
        let path = dir.join("opt.safetensors");
        save(&t.opt, &path).unwrap();
        let ckpt = state_bytes(&t.opt);
        let moved = trained_on(5, device);
        let cuda = usize::from(device >= 0);
        // CPU: the file buffer; CUDA also the host copies of the state and the rollback copy.
        each_allocation_fails(&moved, "lomo_state_load", 1 + 2 * cuda, || {
            load(&moved.opt, &path)
        });
        let other = trained_on(4, device);
        let ckpt4 = state_bytes(&other.opt);
        each_allocation_fails(&moved, "lomo_state_deserialize", 2 * cuda, || {
            load_bytes(&moved.opt, &ckpt4)
        });
        assert_eq!(state_bytes(&moved.opt), ckpt4);
        // Saving reads device state into host memory.
        each_allocation_fails(&moved, "lomo_state_save", cuda, || save(&moved.opt, &path));
        assert_eq!(std::fs::read(&path).unwrap(), ckpt4);
        assert_ne!(ckpt, ckpt4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
