// Corpus program: Rust std I/O on managed files (std only, no crates).
//   argv[1]: output directory (must exist)
//
// BufWriter<File> with many small and some large writes (write_all, and
// write_vectored -> writev), flush, sync_all, rename, fs::copy (copy_file_range,
// sendfile fallback) of the renamed file into another managed file,
// metadata().len() (statx) checks, File::set_len, OpenOptions::append, fs::write,
// Seek + overwrite; everything read back with fs::read and compared.
// Exit 1 on a failed self-check.
use std::ffi::{c_char, c_int, c_void, CString};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, IoSlice, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::exit;

fn fail(msg: String) -> ! {
    eprintln!("rust_io: {}", msg);
    exit(1);
}

fn check(cond: bool, msg: impl FnOnce() -> String) {
    if !cond {
        fail(msg());
    }
}

fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        let k = std::cmp::min(8, n - v.len());
        v.extend_from_slice(&b[..k]);
    }
    v
}

struct Obs {
    text: String,
}

impl Obs {
    fn eq(&mut self, what: &str, got: u64, want: u64) {
        self.text.push_str(&format!("{} {}\n", what, got));
        check(got == want, || format!("{}: got {} expected {}", what, got, want));
    }
}

// struct ackpt_stats (include/ackpt.h) plus room to grow: the library rejects a
// size smaller than its own struct.
#[repr(C)]
struct AckptStats {
    bytes_staged: u64,
    files: u64,
    bytes_written: u64,
    errors: u64,
    ops_pending: u64,
    stall_seconds: f64,
    active: i32,
    helper_flags: i32,
    helper_cpu_seconds: f64,
    staging_bytes: u64,
    spare: [u8; 256],
}

extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

fn report_stats() {
    let path = match std::env::var_os("ACKPT_TEST_STATS") {
        Some(p) => p,
        None => return,
    };
    let name = CString::new("ackpt_get_stats").unwrap();
    // RTLD_DEFAULT is a null handle on glibc.
    let sym = unsafe { dlsym(std::ptr::null_mut(), name.as_ptr()) };
    let text = if sym.is_null() {
        "{\"present\": 0}\n".to_string()
    } else {
        let get: extern "C" fn(*mut AckptStats, usize) -> c_int = unsafe { std::mem::transmute(sym) };
        let mut st: AckptStats = unsafe { std::mem::zeroed() };
        let rc = get(&mut st, std::mem::size_of::<AckptStats>());
        format!(
            "{{\"present\": 1, \"rc\": {}, \"bytes_staged\": {}, \"files\": {}, \"bytes_written\": {}, \
             \"errors\": {}, \"ops_pending\": {}, \"stall_seconds\": {}, \"active\": {}, \
             \"helper_flags\": {}, \"staging_bytes\": {}}}\n",
            rc, st.bytes_staged, st.files, st.bytes_written, st.errors, st.ops_pending,
            st.stall_seconds, st.active, st.helper_flags, st.staging_bytes
        )
    };
    fs::write(path, text).unwrap_or_else(|e| fail(format!("write stats: {}", e)));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 {
        eprintln!("usage: {} OUTDIR", args[0]);
        exit(2);
    }
    let out = PathBuf::from(&args[1]);
    let p = |n: &str| -> PathBuf { out.join(n) };
    let mut obs = Obs { text: String::new() };
    let io = |r: std::io::Result<()>, what: &str| {
        if let Err(e) = r {
            eprintln!("rust_io: {}: {}", what, e);
            exit(2);
        }
    };

    // 1. BufWriter, flush, sync_all, rename.
    let big = pattern(20 << 20, 1);
    let mut expect: Vec<u8> = Vec::new();
    {
        let f = File::create(p("weights.tmp")).unwrap_or_else(|e| fail(format!("create: {}", e)));
        let mut w = BufWriter::new(f);
        for i in 0..5000u32 {
            let rec = format!("record {:05};", i);
            io(w.write_all(rec.as_bytes()), "write_all small");
            expect.extend_from_slice(rec.as_bytes());
        }
        io(w.write_all(&big), "write_all big");
        expect.extend_from_slice(&big);
        let parts = [IoSlice::new(b"vectored-a;"), IoSlice::new(&big[..100_000]), IoSlice::new(b"vectored-b;")];
        let total: usize = parts.iter().map(|s| s.len()).sum();
        let n = w.write_vectored(&parts).unwrap_or_else(|e| fail(format!("write_vectored: {}", e)));
        check(n == total, || format!("write_vectored wrote {} of {}", n, total));
        expect.extend_from_slice(b"vectored-a;");
        expect.extend_from_slice(&big[..100_000]);
        expect.extend_from_slice(b"vectored-b;");
        io(w.flush(), "flush");
        let mut f = w.into_inner().unwrap_or_else(|e| fail(format!("into_inner: {}", e)));
        let pos = f.stream_position().unwrap();
        obs.eq("weights.tmp stream_position", pos, expect.len() as u64);
        obs.eq("weights.tmp file.metadata.len", f.metadata().unwrap().len(), expect.len() as u64);
        io(f.sync_all(), "sync_all");
    }
    io(fs::rename(p("weights.tmp"), p("weights.bin")), "rename");
    check(!p("weights.tmp").exists(), || "weights.tmp still exists after rename".into());
    obs.eq("weights.bin metadata.len", fs::metadata(p("weights.bin")).unwrap().len(), expect.len() as u64);

    // 2. fs::copy of the renamed file to another managed file.
    let copied = fs::copy(p("weights.bin"), p("weights_copy.bin")).unwrap_or_else(|e| fail(format!("copy: {}", e)));
    obs.eq("fs::copy returned", copied, expect.len() as u64);
    obs.eq("weights_copy.bin metadata.len", fs::metadata(p("weights_copy.bin")).unwrap().len(), expect.len() as u64);
    check(fs::read(p("weights.bin")).unwrap() == expect, || "weights.bin read-back mismatch".into());
    check(fs::read(p("weights_copy.bin")).unwrap() == expect, || "weights_copy.bin read-back mismatch".into());

    // 3. Seek + overwrite, set_len shrink/extend, read through the same handle.
    {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(p("seek.bin"))
            .unwrap();
        io(f.write_all(&big[..1 << 20]), "write");
        io(f.seek(SeekFrom::Start(4096)).map(|_| ()), "seek");
        io(f.write_all(b"OVERWRITE"), "overwrite");
        io(f.set_len(700_000), "set_len shrink");
        obs.eq("seek.bin len after shrink", f.metadata().unwrap().len(), 700_000);
        io(f.set_len(900_000), "set_len extend");
        let end = f.seek(SeekFrom::End(0)).unwrap();
        obs.eq("seek.bin SeekFrom::End", end, 900_000);
        io(f.seek(SeekFrom::Start(4090)).map(|_| ()), "seek back");
        let mut buf = [0u8; 20];
        io(f.read_exact(&mut buf), "read_exact");
        let mut want = big[4090..4110].to_vec();
        want[6..15].copy_from_slice(b"OVERWRITE");
        check(buf[..] == want[..], || "seek.bin read through the same handle differs".into());
    }
    let sb = fs::read(p("seek.bin")).unwrap();
    check(sb.len() == 900_000 && sb[700_000..].iter().all(|&b| b == 0), || "seek.bin tail not zero".into());

    // 4. Append mode and fs::write.
    {
        let mut a = OpenOptions::new().append(true).create(true).open(p("append.log")).unwrap();
        for i in 0..500 {
            io(writeln!(a, "append line {}", i), "append");
        }
    }
    {
        let mut a = OpenOptions::new().append(true).open(p("append.log")).unwrap();
        io(a.write_all(b"second open\n"), "append 2");
        obs.eq("append.log len", a.metadata().unwrap().len(), fs::read(p("append.log")).unwrap().len() as u64);
    }
    io(fs::write(p("small.txt"), b"fs::write\n"), "fs::write");
    check(fs::read_to_string(p("small.txt")).unwrap() == "fs::write\n", || "small.txt differs".into());

    let obs_path: &Path = &p("observed.txt");
    io(fs::write(obs_path, obs.text.as_bytes()), "write observed.txt");
    report_stats();
}
