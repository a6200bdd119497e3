//! Stores in object storage, against a real S3-compatible server (`s3s-fs`,
//! built by scripts/setup.sh) on 127.0.0.1: two workers on separate
//! "machines" (separate caches, no shared folder) fill one bucket with the
//! local store's bytes; a worker killed while it uploads leaves no shard
//! visible that is not whole, and its rerun finishes; training from the
//! bucket through the cache gives the local store's losses; a corrupted
//! object is found; the cache's size limit evicts only what no one reads;
//! bad URLs, missing buckets and wrong keys are one line naming the object.
//! The same store goes through Azure Blob Storage's emulator (Azurite,
//! also built by setup). Google Cloud Storage is not tested: no emulator
//! of it that object_store speaks to installs from the registries here.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use caev2_tests::*;

/// A server that `scripts/setup.sh --tests` installs under `.deps/`.
fn test_server(rel: &str) -> PathBuf {
    let p = workspace().join(".deps").join(rel);
    assert!(p.exists(), "{} missing: run scripts/setup.sh --tests (scripts/test.sh does)", p.display());
    p
}

const KEY: &str = "caev2-test-key";
const SECRET: &str = "caev2-test-secret";

/// A free TCP port of 127.0.0.1.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port()
}

/// A test server on 127.0.0.1 (S3 or Azure), the environment that points
/// `caev2` at it, and the folder it serves; killed when dropped.
struct Server {
    child: Child,
    port: u16,
    root: PathBuf,
    env: Vec<(&'static str, String)>,
}

impl Server {
    /// Start `cmd` (a server listening on `port`) and wait until it accepts connections.
    fn spawn(mut cmd: Command, port: u16, root: &Path, env: Vec<(&'static str, String)>) -> Self {
        let what = format!("{:?}", cmd.get_program());
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start the server");
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(30), "{what} did not start listening on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port, root: root.to_owned(), env }
    }

    /// An `s3s-fs` server serving `root` (each folder a bucket, each object a file).
    fn s3(root: &Path) -> Self {
        std::fs::create_dir_all(root).expect("server root");
        let port = free_port();
        let mut cmd = Command::new(test_server("s3s-fs/bin/s3s-fs"));
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", KEY, "--secret-key", SECRET]).arg(root);
        let env = vec![
            ("AWS_ACCESS_KEY_ID", KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
        ];
        Self::spawn(cmd, port, root, env)
    }

    /// Azurite (Microsoft's Azure Blob Storage emulator, built by setup),
    /// its data in `dir`, with one container.
    fn azurite(dir: &Path, container: &str) -> Self {
        let port = free_port();
        let mut cmd = Command::new(test_server("azurite/node_modules/.bin/azurite-blob"));
        cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--silent", "--skipApiVersionCheck", "--location"]).arg(dir);
        let env = vec![("AZURE_STORAGE_USE_EMULATOR", "true".to_owned()), ("AZURITE_BLOB_STORAGE_URL", format!("http://127.0.0.1:{port}"))];
        let server = Self::spawn(cmd, port, dir, env);
        let made = Command::new(python())
            .arg(workspace().join("tests/scripts/create_azure_container.py"))
            .args([&port.to_string(), container])
            .status()
            .expect("create container");
        assert!(made.success(), "creating the container failed");
        server
    }

    /// The folder of bucket `name` of an `s3s-fs` server, created.
    fn bucket(&self, name: &str) -> PathBuf {
        let b = self.root.join(name);
        std::fs::create_dir_all(&b).expect("bucket");
        b
    }

    /// `caev2 ARGS` with this server as the endpoint.
    fn command<A: AsRef<std::ffi::OsStr>>(&self, args: &[A]) -> Command {
        let mut c = Command::new(caev2());
        c.args(args).envs(self.env.iter().map(|(k, v)| (*k, v.as_str())));
        c
    }

    fn run<A: AsRef<std::ffi::OsStr>>(&self, args: &[A]) -> Output {
        self.command(args).output().expect("spawn caev2")
    }

    fn run_ok<A: AsRef<std::ffi::OsStr>>(&self, args: &[A]) -> String {
        let o = self.run(args);
        let args: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
        assert!(
            o.status.success(),
            "caev2 {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Two workers on separate caches (two machines) extracting into `url`
    /// at once; returns the shards they wrote between them.
    fn extract_with_two_workers(&self, data: &Path, url: &str, caches: [&Path; 2]) -> u64 {
        let workers: Vec<Child> = caches
            .iter()
            .map(|c| self.command(&extract_args(data, url, c)).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn"))
            .collect();
        let mut written = 0;
        for w in workers {
            let o = w.wait_with_output().expect("wait");
            assert!(o.status.success(), "worker failed: {}", String::from_utf8_lossy(&o.stderr));
            written += json(&String::from_utf8_lossy(&o.stdout))["shards_written"].as_u64().expect("shards_written");
        }
        written
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const EXTRACT: [&str; 7] = ["--views", "2", "--student-size", "112", "--images-per-shard", "4", "--embed-images"];

/// `extract` of the tiny teacher into `out` (a bucket URL), staged in `cache`.
fn extract_args<'a>(data: &'a Path, out: &'a str, cache: &'a Path) -> Vec<String> {
    let mut a = vec![
        "extract",
        "--teacher",
        s(TEACHER.get_or_init(tiny_vit)),
        "--data",
        s(data),
        "--out",
        out,
        "--cache",
        s(cache),
        "--no-progress",
        "--json",
    ];
    a.extend(EXTRACT);
    a.into_iter().map(str::to_owned).collect()
}

static TEACHER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn train_args<'a>(store: &'a str, out: &'a Path, cache: &'a Path) -> Vec<&'a str> {
    let mut a = vec!["train", "--shards", store, "--cache", s(cache), "--out", s(out), "--batch", "4", "--steps", "6", "--lr", "5e-4"];
    a.extend(["--warmup-steps", "2", "--threads", "1", "--device", "cpu", "--no-progress"]);
    a
}

fn failed(o: &Output) -> String {
    assert!(!o.status.success(), "should fail: {}", String::from_utf8_lossy(&o.stdout));
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e}");
    e
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).expect("json")
}

/// 20 photos, the store extracted from them into a local folder (the
/// reference), and a server with the bucket `caev2` (its folder).
fn with_reference_store() -> (tempfile::TempDir, PathBuf, PathBuf, Server, PathBuf) {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    imagenet_dataset(&data, 20);
    let local = tmp.path().join("local");
    extract_tiny(&data, &local, &EXTRACT);
    let server = Server::s3(&tmp.path().join("s3"));
    let bucket = server.bucket("caev2");
    (tmp, data, local, server, bucket)
}

#[test]
fn two_workers_fill_a_bucket_with_the_local_bytes_and_training_from_it_matches() {
    let (tmp, data, local, server, bucket) = with_reference_store();
    let url = "s3://caev2/stores/tiny";
    // two machines: each its own staging cache, no folder in common; they
    // divide the shards by claims in the bucket
    let (cache_a, cache_b) = (tmp.path().join("machine-a"), tmp.path().join("machine-b"));
    let written = server.extract_with_two_workers(&data, url, [&cache_a, &cache_b]);
    // each shard written once, or rarely twice: s3s-fs checks a conditional
    // write's condition and then writes, so two claims made at the same
    // instant can both succeed (S3 itself is atomic); twice is harmless,
    // the bytes are the same
    assert!((5..10).contains(&written), "{written} shard writes between the two workers: the claims did not divide the work");
    let in_bucket = bucket.join("stores/tiny");
    assert_eq!(store_contents(&in_bucket), store_contents(&local), "the bucket's store differs from the local one");
    assert!(!in_bucket.join("claims").exists() || std::fs::read_dir(in_bucket.join("claims")).expect("ls").count() == 0, "claims left");
    let again = json(&server.run_ok(&extract_args(&data, url, &cache_a)));
    assert_eq!((again["shards_written"].as_u64(), again["shards_already_done"].as_u64()), (Some(0), Some(5)));
    assert_eq!(again["store_complete"], true);

    // an existing store folder uploaded: the same objects
    server.run_ok(&["inspect", "upload", s(&local), "s3://caev2/uploaded"]);
    assert_eq!(store_contents(&bucket.join("uploaded")), store_contents(&local));
    let again = server.run_ok(&["inspect", "upload", s(&local), "s3://caev2/uploaded", "--json"]);
    assert_eq!(json(&again)["uploaded"]["shards_already_there"], 5);
    // a prefix holding another store (here: the same views without their images) is refused
    let plain = tmp.path().join("plain");
    extract_tiny(&data, &plain, &EXTRACT[..6]);
    let e = failed(&server.run(&["inspect", "upload", s(&plain), "s3://caev2/uploaded"]));
    assert!(
        e.contains("s3://caev2/uploaded/manifest.json")
            && e.contains("holds another store")
            && e.contains("format_version is 2 there, 1 here"),
        "{e}"
    );

    // read through a third machine's cache: verify, and train without --data
    let cache_c = tmp.path().join("machine-c");
    // one image's views need its shard, not the store
    let cache_d = tmp.path().join("machine-d");
    server.run_ok(&["inspect", "render", url, "--image", "17", "--out", s(&tmp.path().join("v.png")), "--cache", s(&cache_d)]);
    let fetched: Vec<String> = std::fs::read_dir(cache_d.join("stores/s3/caev2/stores%2Ftiny/shards"))
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(fetched, vec!["shard-00004.bin".to_owned()]);
    let fetched = json(&server.run_ok(&["inspect", "fetch", url, "--cache", s(&cache_c), "--json"]));
    assert!(fetched["fetched_bytes"].as_u64().expect("bytes") > 0);
    let again = json(&server.run_ok(&["inspect", "fetch", url, "--cache", s(&cache_c), "--json"]));
    assert_eq!(again["fetched_bytes"], 0, "a warm cache fetches nothing");
    let verify = server.run_ok(&["inspect", "verify", url, "--cache", s(&cache_c)]);
    assert!(verify.contains("store is intact"), "{verify}");
    let (from_bucket, from_local) = (tmp.path().join("run-bucket"), tmp.path().join("run-local"));
    server.run_ok(&train_args(url, &from_bucket, &cache_c));
    server.run_ok(&train_args(s(&local), &from_local, &cache_c));
    let (a, b) = (losses(&from_bucket), losses(&from_local));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "training from the bucket differs from training from the local store");

    // a cached copy cut short (a partial download, a full disk) is fetched again
    let cached = cache_c.join("stores/s3/caev2/stores%2Ftiny");
    let shard = cached.join("shards/shard-00003.bin");
    let len = std::fs::metadata(&shard).expect("cached shard").len();
    std::fs::OpenOptions::new().write(true).open(&shard).expect("open").set_len(len / 2).expect("truncate");
    let verify = server.run_ok(&["inspect", "verify", url, "--cache", s(&cache_c)]);
    assert!(verify.contains("store is intact"), "{verify}");
    assert_eq!(std::fs::metadata(&shard).expect("refetched").len(), len);
    // damage of the same size in the copy: verify names it and drops the shard, the next command fetches it again
    let mut b = std::fs::read(&shard).expect("cached");
    let at = b.len() / 2;
    b[at] ^= 1;
    std::fs::write(&shard, &b).expect("damage");
    let o = server.run(&["inspect", "verify", url, "--cache", s(&cache_c)]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("shard 3: dropped from the cached copy"), "{}", String::from_utf8_lossy(&o.stderr));
    let verify = server.run_ok(&["inspect", "verify", url, "--cache", s(&cache_c)]);
    assert!(verify.contains("store is intact"), "{verify}");
}

#[test]
fn a_worker_killed_while_it_uploads_leaves_only_whole_shards_and_its_rerun_finishes() {
    let (tmp, data, local, server, bucket) = with_reference_store();
    let url = "s3://caev2/killed";
    let in_bucket = bucket.join("killed");
    let cache = tmp.path().join("cache");

    // SIGKILL the worker as soon as its second shard file is in the bucket:
    // between that upload and the shard's report, or just after
    let mut w = server.command(&extract_args(&data, url, &cache)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
    let target = in_bucket.join("shards/shard-00001.bin");
    let t = Instant::now();
    while !target.exists() {
        assert!(t.elapsed() < Duration::from_secs(120), "the worker never uploaded shard 1");
        assert!(w.try_wait().expect("poll").is_none(), "the worker ended before it was killed");
        std::thread::sleep(Duration::from_micros(200));
    }
    w.kill().expect("kill");
    w.wait().expect("reap");
    let done: Vec<String> = std::fs::read_dir(in_bucket.join("done"))
        .map_or(Vec::new(), |d| d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect());
    assert!(done.len() < 5, "the worker was killed before it finished: {done:?}");
    // every shard the bucket calls complete is whole (a reader sees nothing else)
    let local_files = store_contents(&local);
    for name in &done {
        for sub in ["done", "index", "images", "shards"] {
            let rel = format!(
                "{sub}/{}",
                name.replace(
                    ".json",
                    if sub == "index" {
                        ".parquet"
                    } else if sub == "done" {
                        ".json"
                    } else {
                        ".bin"
                    }
                )
            );
            let want = &local_files.iter().find(|(n, _)| *n == rel).expect("in the local store").1;
            assert_eq!(&std::fs::read(in_bucket.join(&rel)).expect("complete shard's file"), want, "{rel}");
        }
    }
    let o = server.run(&[
        "train",
        "--shards",
        url,
        "--cache",
        s(&tmp.path().join("reader")),
        "--out",
        s(&tmp.path().join("run")),
        "--steps",
        "1",
    ]);
    assert!(failed(&o).contains("not complete"), "training refuses a store the bucket does not call complete");

    // the rerun takes the dead worker's claim over at once and finishes the store
    let out = json(&server.run_ok(&extract_args(&data, url, &cache)));
    assert_eq!(out["store_complete"], true, "{out}");
    assert_eq!(store_contents(&in_bucket), store_contents(&local));
}

#[test]
fn a_corrupted_object_is_found_and_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    imagenet_dataset(&data, 8);
    let server = Server::s3(&tmp.path().join("s3"));
    let bucket = server.bucket("caev2");
    let url = "s3://caev2/store";
    server.run_ok(&extract_args(&data, url, &tmp.path().join("stage")));
    // bit rot in the bucket, behind the server's back
    for (file, what) in [("shards/shard-00001.bin", "record"), ("images/shard-00000.bin", "CRC-32C")] {
        let p = bucket.join("store").join(file);
        let mut b = std::fs::read(&p).expect("object");
        let at = b.len() / 2;
        b[at] ^= 0x40;
        std::fs::write(&p, &b).expect("corrupt");
        let o = server.run(&["inspect", "verify", url, "--cache", s(&tmp.path().join(format!("reader-{}", file.replace('/', "-"))))]);
        let e = failed(&o);
        assert!(e.contains(&format!("{url}/{file}")) && e.contains(what) && e.contains("3 downloads"), "{e}");
        b[at] ^= 0x40;
        std::fs::write(&p, &b).expect("repair");
    }
}

#[test]
fn the_cache_limit_evicts_only_stores_no_one_reads() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    imagenet_dataset(&data, 8);
    let server = Server::s3(&tmp.path().join("s3"));
    server.bucket("caev2");
    for name in ["a", "b"] {
        let url = format!("s3://caev2/{name}");
        server.run_ok(&extract_args(&data, &url, &tmp.path().join("stage")));
    }
    let cache = tmp.path().join("cache");
    let copy = |name: &str| cache.join("stores/s3/caev2").join(name);
    let bulk = |name: &str| -> u64 {
        ["shards", "images"]
            .iter()
            .flat_map(|d| std::fs::read_dir(copy(name).join(d)).into_iter().flatten())
            .map(|e| e.expect("entry").metadata().expect("meta").len())
            .sum()
    };
    server.run_ok(&["inspect", "verify", "s3://caev2/a", "--cache", s(&cache)]);
    let one = bulk("a");
    assert!(one > 0);
    let limit = format!("{}", one + one / 2); // one store fits, two do not
    // too small for the store itself: refused before anything is fetched
    let e = failed(&server.run(&["inspect", "verify", "s3://caev2/b", "--cache", s(&cache), "--cache-limit", "1000"]));
    assert!(e.contains("more than --cache-limit"), "{e}");
    assert_eq!(bulk("b"), 0);
    // b fits once a, which no one reads, is evicted
    server.run_ok(&["inspect", "verify", "s3://caev2/b", "--cache", s(&cache), "--cache-limit", &limit]);
    assert_eq!((bulk("a"), bulk("b")), (0, one));
    // while a training reads b, a cannot take its place
    let mut reader = server
        .command(&["train", "--shards", "s3://caev2/b", "--cache", s(&cache), "--out", s(&tmp.path().join("run")), "--steps", "400"])
        .args(["--batch", "2", "--lr", "5e-4", "--threads", "1", "--device", "cpu", "--no-progress"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let metrics = tmp.path().join("run/metrics.jsonl");
    let t = Instant::now();
    while !metrics.exists() {
        assert!(t.elapsed() < Duration::from_secs(120), "the training did not start");
        if let Some(status) = reader.try_wait().expect("poll") {
            let mut err = String::new();
            std::io::Read::read_to_string(reader.stderr.as_mut().expect("stderr"), &mut err).expect("read");
            panic!("the training ended ({status}): {err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let e = failed(&server.run(&["inspect", "verify", "s3://caev2/a", "--cache", s(&cache), "--cache-limit", &limit]));
    assert!(e.contains("end the other runs"), "{e}");
    assert_eq!(bulk("b"), one, "a store being read was evicted");
    reader.kill().expect("kill");
    reader.wait().expect("reap");
}

#[test]
fn bad_urls_missing_buckets_and_wrong_keys_are_one_line_naming_the_object() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::s3(&tmp.path().join("s3"));
    server.bucket("caev2");
    let cache = tmp.path().join("cache");
    let e = failed(&server.run(&["inspect", "summary", "s3://no-such-bucket/x", "--cache", s(&cache)]));
    assert!(e.contains("s3://no-such-bucket/x: list failed") && e.contains("NoSuchBucket"), "{e}");
    let e = failed(&server.run(&["inspect", "summary", "s3://caev2/nothing-here", "--cache", s(&cache)]));
    assert!(e.contains("s3://caev2/nothing-here/manifest.json") && e.contains("no store here"), "{e}");
    let e = failed(
        &server
            .command(&["inspect", "summary", "s3://caev2/x", "--cache", s(&cache)])
            .env("AWS_SECRET_ACCESS_KEY", "wrong")
            .output()
            .expect("spawn"),
    );
    assert!(e.contains("s3://caev2/x/manifest.json"), "{e}");
    let e = failed(&server.run(&["inspect", "summary", "gopher://caev2/x", "--cache", s(&cache)]));
    assert!(e.contains("gopher:// is not supported"), "{e}");
}

#[test]
fn a_large_file_goes_up_in_checked_parts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::s3(&tmp.path().join("s3"));
    let bucket_dir = server.bucket("caev2");
    let endpoint = format!("http://127.0.0.1:{}", server.port);
    let settings = [
        ("aws_access_key_id", KEY),
        ("aws_secret_access_key", SECRET),
        ("aws_region", "us-east-1"),
        ("aws_endpoint", endpoint.as_str()),
        ("aws_allow_http", "true"),
    ];
    let bucket = remote_store::Bucket::open_with("s3://caev2/big", &settings).expect("client");
    // three parts: two of PART_SIZE and a short one
    let len = 2 * remote_store::PART_SIZE + 12_345;
    assert!(len as u64 > remote_store::MULTIPART_THRESHOLD);
    let mut x = 0x9E37_79B9_7F4A_7C15_u64;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let src = tmp.path().join("big.bin");
    std::fs::write(&src, &bytes).expect("write");
    // the server's tag (MD5 of the parts' MD5s, -3) is checked against the local bytes
    assert_eq!(bucket.upload_checked(&src, "shards/shard-00000.bin").expect("upload"), len as u64);
    assert_eq!(std::fs::read(bucket_dir.join("big/shards/shard-00000.bin")).expect("stored"), bytes);
    let meta = bucket.head("shards/shard-00000.bin").expect("head").expect("exists");
    assert!(meta.e_tag.as_deref().is_some_and(|t| t.trim_matches('"').ends_with("-3")), "{:?}", meta.e_tag);
}

#[test]
fn a_store_in_azure_blob_storage_is_the_local_store_and_trains_the_same() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    imagenet_dataset(&data, 20);
    let local = tmp.path().join("local");
    extract_tiny(&data, &local, &EXTRACT);
    let azure = Server::azurite(&tmp.path().join("azurite"), "caev2");
    let url = "az://caev2/stores/tiny";
    // two workers on separate caches, dividing the shards by claims
    let written = azure.extract_with_two_workers(&data, url, [&tmp.path().join("machine-a"), &tmp.path().join("machine-b")]);
    assert!((5..10).contains(&written), "{written} shard writes");
    // what a third machine fetches (every object, checked) is the local store, byte for byte
    let cache = tmp.path().join("machine-c");
    let verify = azure.run_ok(&["inspect", "verify", url, "--cache", s(&cache)]);
    assert!(verify.contains("store is intact"), "{verify}");
    assert_eq!(store_contents(&cache.join("stores/az/caev2/stores%2Ftiny")), store_contents(&local));
    let (from_azure, from_local) = (tmp.path().join("run-azure"), tmp.path().join("run-local"));
    azure.run_ok(&train_args(url, &from_azure, &cache));
    azure.run_ok(&train_args(s(&local), &from_local, &cache));
    assert_eq!(losses(&from_azure), losses(&from_local));
    let o = azure.command(&["inspect", "summary", "az://no-such-container/x", "--cache", s(&cache)]).output().expect("spawn");
    let e = failed(&o);
    assert!(e.contains("az://no-such-container/x: list failed"), "{e}");
}

#[test]
fn losing_the_server_mid_extraction_stops_it_with_one_line_naming_the_object() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    imagenet_dataset(&data, 20);
    let mut server = Server::s3(&tmp.path().join("s3"));
    let bucket = server.bucket("caev2");
    let mut args = extract_args(&data, "s3://caev2/lost", &tmp.path().join("stage"));
    let at = args.iter().position(|a| a == "--images-per-shard").expect("flag");
    args[at + 1] = "1".into(); // 20 shards, uploaded behind the pipeline
    let mut w = server.command(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    let first = bucket.join("lost/done/shard-00000.json");
    let t = Instant::now();
    while !first.exists() {
        assert!(t.elapsed() < Duration::from_secs(120), "no shard was published");
        assert!(w.try_wait().expect("poll").is_none(), "extract ended before the server went away");
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = server.child.kill();
    let _ = server.child.wait();
    let t = Instant::now();
    let o = loop {
        if w.try_wait().expect("poll").is_some() {
            break w.wait_with_output().expect("output");
        }
        assert!(t.elapsed() < Duration::from_secs(120), "extract did not stop after the server went away");
        std::thread::sleep(Duration::from_millis(50));
    };
    let e = failed(&o);
    assert!(e.contains("s3://caev2/lost/") && e.contains("failed"), "{e}");
}

#[test]
fn credentials_and_endpoint_come_from_an_aws_profile() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    imagenet_dataset(&data, 4);
    let local = tmp.path().join("local");
    extract_tiny(&data, &local, &EXTRACT);
    let server = Server::s3(&tmp.path().join("s3"));
    server.bucket("caev2");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(home.join(".aws")).expect("mkdir");
    std::fs::write(home.join(".aws/credentials"), format!("[lab]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n"))
        .expect("write");
    std::fs::write(
        home.join(".aws/config"),
        format!("[profile lab]\nregion = us-east-1\nendpoint_url = http://127.0.0.1:{}\n", server.port),
    )
    .expect("write");
    let caev2_with_profile = |args: &[&str]| {
        let mut c = Command::new(caev2());
        c.args(args).env("HOME", &home).env("AWS_PROFILE", "lab").env("AWS_ALLOW_HTTP", "true");
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT",
        ] {
            c.env_remove(var);
        }
        c.output().expect("spawn")
    };
    let o = caev2_with_profile(&["inspect", "upload", s(&local), "s3://caev2/profiled"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = caev2_with_profile(&["inspect", "summary", "s3://caev2/profiled", "--cache", s(&tmp.path().join("cache"))]);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("s3://caev2/profiled"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut c = Command::new(caev2());
    c.args(["inspect", "summary", "s3://caev2/profiled"]).env("HOME", &home).env("AWS_PROFILE", "missing");
    let e = failed(&c.output().expect("spawn"));
    assert!(e.contains("AWS_PROFILE=missing: no such profile"), "{e}");
}

#[test]
fn two_ranks_on_one_node_fetch_a_bucket_into_one_cache_and_train_what_one_process_trains() {
    let (tmp, _data, local, server, _bucket) = with_reference_store();
    let url = "s3://caev2/dp";
    server.run_ok(&["inspect", "upload", s(&local), url]);
    let cache = tmp.path().join("node-cache"); // cold, shared by both ranks
    let e = failed(&server.run(&["inspect", "fetch", s(&local)]));
    assert!(e.contains("not a bucket URL"), "{e}");
    let single = tmp.path().join("single");
    server.run_ok(&train_args(s(&local), &single, &cache));
    let pair = tmp.path().join("pair");
    let port = free_port().to_string();
    let ranks: Vec<Child> = (0..2)
        .map(|rank| {
            server
                .command(&train_args(url, &pair, &cache))
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("LOCAL_WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn rank")
        })
        .collect();
    for r in ranks {
        let o = r.wait_with_output().expect("wait");
        assert!(o.status.success(), "rank failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let (a, b) = (losses(&pair), losses(&single));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x.1 - y.1).abs() <= 1e-5 * y.1.abs(), "step {}: {} vs {}", x.0, x.1, y.1);
    }
}

#[test]
fn a_worker_that_loses_the_race_to_create_a_pca_store_adopts_the_winners_model() {
    // two models for the same settings: one fitted on the teacher's f32 targets
    // (extract), one on the f16-rounded ones (recode): what machines that round
    // differently would fit
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    imagenet_dataset(&data, 8);
    let (mine, f16, theirs) = (tmp.path().join("mine"), tmp.path().join("f16"), tmp.path().join("theirs"));
    let fit = ["--views", "2", "--student-size", "112", "--fit-views", "16"];
    extract_tiny(&data, &mine, &[&fit[..], &["--codec", "pca"]].concat());
    extract_tiny(&data, &f16, &fit[..4]);
    run_ok(&["inspect", "recode", s(&f16), s(&theirs), "--codec", "pca", "--fit-views", "16"]);
    let (m, t) = (shard_store::Manifest::read(&mine).expect("mine"), shard_store::Manifest::read(&theirs).expect("theirs"));
    assert!(m.first_difference(&t).is_none(), "the same settings");
    assert_ne!(m.store_id, t.store_id, "different models");

    let server = Server::s3(&tmp.path().join("s3"));
    server.bucket("caev2");
    let endpoint = format!("http://127.0.0.1:{}", server.port);
    let settings = [
        ("aws_access_key_id", KEY),
        ("aws_secret_access_key", SECRET),
        ("aws_region", "us-east-1"),
        ("aws_endpoint", endpoint.as_str()),
        ("aws_allow_http", "true"),
    ];
    let publisher = |prefix: &str| {
        let bucket = remote_store::Bucket::open_with(&format!("s3://caev2/{prefix}"), &settings).expect("client");
        remote_store::Publisher::new(bucket, remote_store::DEFAULT_CLAIM_TTL)
    };
    // the winner publishes first
    assert!(publisher("race").push_manifest(&theirs, &t).expect("push").is_none());
    // the loser had fitted its own model in its staging folder (no shard yet)
    let staging = tmp.path().join("staging");
    std::fs::create_dir_all(&staging).expect("mkdir");
    let model = m.codec_fit.as_ref().expect("fit").file.clone();
    std::fs::copy(mine.join("manifest.json"), staging.join("manifest.json")).expect("cp");
    std::fs::copy(mine.join(&model), staging.join(&model)).expect("cp");
    let p = publisher("race");
    let remote = p.push_manifest(&staging, &m).expect("push").expect("the bucket holds the winner's store");
    assert_eq!(remote.store_id, t.store_id);
    p.adopt_manifest(&staging, &m, &remote).expect("adopt");
    assert_eq!(
        std::fs::read(staging.join("manifest.json")).expect("adopted"),
        std::fs::read(theirs.join("manifest.json")).expect("theirs")
    );
    assert!(!staging.join(&model).exists(), "the losing model is gone");
    let writer = shard_store::StoreWriter::create_or_open(&staging, &m).expect("the adopted store opens for the same settings");
    assert_eq!(writer.manifest().store_id, t.store_id);
    // a staging folder that already holds shards is never rewritten
    assert!(p.adopt_manifest(&mine, &m, &remote).is_err());
}
