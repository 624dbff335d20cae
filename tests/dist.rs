//! vidfuse::dist across real processes: Gloo over 127.0.0.1, ranks launched directly (each
//! test picks a free port) or by torchrun (`--standalone`: its agent picks the port).
//!
//! Worker tests run this test binary again once per rank, with the launch variables set and
//! `VIDFUSE_DIST_WORKER=1`; in a worker the test body is the rank's side of the test.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tch::{nn, nn::Module, Device, Kind, Tensor};
use vidfuse::dist::{shard_range, Backend, DataParallel, Dist, DistOptions, LaunchEnv, ReduceOp};
use vidfuse::VidError;

const WORKER: &str = "VIDFUSE_DIST_WORKER";

fn is_worker() -> bool {
    std::env::var_os(WORKER).is_some()
}

/// A port nobody listens on now (the kernel's choice for port 0), for a direct launch.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

fn rank_env(cmd: &mut Command, rank: usize, world: usize, port: u16) {
    cmd.env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("OMP_NUM_THREADS", "1")
        .env_remove("TORCHELASTIC_USE_AGENT_STORE");
}

/// A child that is killed and reaped if dropped unwaited: a failed assertion leaves no process.
struct KillOnDrop(Child);

impl KillOnDrop {
    fn spawn(cmd: &mut Command) -> Self {
        Self(cmd.spawn().unwrap())
    }
}

impl KillOnDrop {
    /// Ends the child and reaps it. SIGTERM first: torchrun starts its workers in a session
    /// of their own, out of reach of a SIGKILL sent to it, and stops them on SIGTERM.
    fn terminate(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        self.0.wait()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.terminate();
        }
    }
}

impl Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Waits for `child` at most `limit`; kills it past that and says so.
fn wait_limited(mut child: KillOnDrop, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let status = child.terminate().unwrap();
            panic!(
                "a process ran past {limit:?} and was killed ({status}); stderr:\n{}",
                String::from_utf8_lossy(&err_reader.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    let output = Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    };
    (output, elapsed)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs this binary's test `name` as `world` ranks and checks that every rank passed.
fn run_workers(name: &str, world: usize) {
    let port = free_port();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<KillOnDrop> = (0..world)
        .map(|rank| {
            let mut cmd = Command::new(&exe);
            cmd.args([name, "--exact", "--nocapture", "--test-threads", "1"])
                .env(WORKER, "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            rank_env(&mut cmd, rank, world, port);
            KillOnDrop::spawn(&mut cmd)
        })
        .collect();
    for (rank, child) in children.into_iter().enumerate() {
        let (out, _) = wait_limited(child, Duration::from_secs(120));
        assert!(
            out.status.success() && text(&out.stdout).contains("1 passed"),
            "rank {rank} of {name} failed ({}):\n{}\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

fn join(timeout: Duration) -> Dist {
    Dist::init(Device::Cpu, &DistOptions::default().timeout(timeout)).expect("joining the group")
}

// ---------------------------------------------------------------------------------------
// The launch environment

fn parse(vars: &[(&str, &str)]) -> Result<Option<LaunchEnv>, VidError> {
    LaunchEnv::from_lookup(|name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    })
}

fn bad_var(vars: &[(&str, &str)]) -> (&'static str, String) {
    match parse(vars) {
        Err(VidError::Environment { var, message }) => (var, message),
        other => panic!("{vars:?}: expected an environment error, got {other:?}"),
    }
}

#[test]
fn launch_environment_is_parsed_and_errors_name_the_variable() {
    if is_worker() {
        return;
    }
    assert_eq!(parse(&[]).unwrap(), None, "no launch variables: alone");
    let good = [
        ("RANK", "1"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.2"),
        ("MASTER_PORT", "29500"),
    ];
    let env = parse(&good).unwrap().unwrap();
    assert_eq!(
        env,
        LaunchEnv {
            rank: 1,
            world_size: 4,
            local_rank: 1,
            master_addr: "10.0.0.2".into(),
            master_port: 29500,
            agent_store: false,
        }
    );
    let mut agent = good.to_vec();
    agent.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
    assert!(parse(&agent).unwrap().unwrap().agent_store);

    let with = |k: &'static str, v: &'static str| {
        let mut vars: Vec<(&str, &str)> = good.iter().filter(|(n, _)| *n != k).copied().collect();
        vars.push((k, v));
        vars
    };
    let without =
        |k: &str| -> Vec<(&str, &str)> { good.iter().filter(|(n, _)| *n != k).copied().collect() };
    for (vars, var, needle) in [
        (with("RANK", "4"), "RANK", "not below WORLD_SIZE"),
        (with("RANK", "-1"), "RANK", "\"-1\""),
        (with("WORLD_SIZE", "two"), "WORLD_SIZE", "\"two\""),
        (with("WORLD_SIZE", "0"), "WORLD_SIZE", "at least 1"),
        (with("LOCAL_RANK", "x"), "LOCAL_RANK", "\"x\""),
        (with("MASTER_PORT", "99999"), "MASTER_PORT", "99999"),
        (with("MASTER_PORT", "0"), "MASTER_PORT", "port number"),
        (with("MASTER_ADDR", " "), "MASTER_ADDR", "empty"),
        (without("RANK"), "RANK", "not set"),
        (without("WORLD_SIZE"), "WORLD_SIZE", "not set"),
        (without("MASTER_ADDR"), "MASTER_ADDR", "not set"),
        (without("MASTER_PORT"), "MASTER_PORT", "not set"),
    ] {
        let (got, message) = bad_var(&vars);
        assert_eq!(got, var, "{vars:?}: {message}");
        assert!(
            message.contains(needle),
            "{vars:?}: {message:?} lacks {needle:?}"
        );
        let shown = VidError::Environment { var: got, message }.to_string();
        assert!(shown.contains(var), "{shown}");
    }
    // LOCAL_RANK defaults to RANK (a launcher that does not set it).
    assert_eq!(
        parse(&without("LOCAL_RANK")).unwrap().unwrap().local_rank,
        1
    );
}

#[test]
fn shards_split_the_global_batch_in_rank_order() {
    if is_worker() {
        return;
    }
    for (len, world) in [(64, 2), (64, 1), (10, 3), (2, 4), (0, 2), (7, 7)] {
        let parts: Vec<_> = (0..world).map(|r| shard_range(len, r, world)).collect();
        let joined: Vec<usize> = parts.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(
            joined,
            (0..len).collect::<Vec<_>>(),
            "len {len} world {world}"
        );
        let (min, max) = (
            parts.iter().map(|r| r.len()).min().unwrap(),
            parts.iter().map(|r| r.len()).max().unwrap(),
        );
        assert!(max - min <= 1, "len {len} world {world}: {parts:?}");
    }
    assert_eq!(shard_range(64, 1, 2), 32..64);
    let alone = Dist::local(Device::Cpu, &DistOptions::default());
    assert_eq!(alone.shard(&[1, 2, 3]), &[1, 2, 3]);
    assert_eq!(alone.local_loss_weight(3), 1.0);
    let mut t = Tensor::from_slice(&[2.0f32]);
    alone.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    alone.barrier().unwrap();
    assert_eq!(
        t.double_value(&[0]),
        2.0,
        "alone, collectives leave tensors as they are"
    );
}

// ---------------------------------------------------------------------------------------
// Collectives and gradients, two ranks

#[test]
fn collectives_two_ranks() {
    if !is_worker() {
        assert!(Backend::Gloo.is_built(), "built without gloo's headers");
        return run_workers("collectives_two_ranks", 2);
    }
    let dist = join(Duration::from_secs(60));
    let (r, w) = (dist.rank() as f64, dist.world_size() as f64);
    assert_eq!(dist.world_size(), 2);
    let base = Tensor::from_slice(&[1.0f64, -2.0, 3.5]);
    for (op, expect) in [
        (ReduceOp::Sum, &base * (w * (w + 1.0) / 2.0)),
        (ReduceOp::Max, &base * w),
        (ReduceOp::Min, &base * 1.0),
    ] {
        let mut t = &base * (r + 1.0);
        dist.all_reduce(&mut t, op).unwrap();
        // Max/min of (r+1)*x over ranks: w*x where x > 0, 1*x where x < 0, and vice versa.
        let expect = match op {
            ReduceOp::Max => base.where_self(&base.lt(0.0), &expect),
            ReduceOp::Min => (&base * w).where_self(&base.lt(0.0), &expect),
            ReduceOp::Sum => expect,
        };
        assert_eq!(
            Vec::<f64>::try_from(&t).unwrap(),
            Vec::<f64>::try_from(&expect).unwrap(),
            "{op:?}"
        );
    }
    let mean = dist.all_reduce_mean(&Tensor::from(r as f32)).unwrap();
    assert_eq!(mean.double_value(&[]), 0.5);
    let tensors = [
        Tensor::full([4], r, (Kind::Float, Device::Cpu)),
        Tensor::from(10.0 * r),
    ];
    dist.broadcast(&tensors, 1).unwrap();
    assert_eq!(tensors[0].sum(Kind::Double).double_value(&[]), 4.0);
    assert_eq!(tensors[1].double_value(&[]), 10.0);
    dist.barrier().unwrap();
    assert_eq!(
        dist.shard(&(0..64).collect::<Vec<i32>>())[0],
        32 * dist.rank() as i32
    );
}

/// Two linear layers; the second is used only where `use_extra` (unused parameters). The
/// store also holds a variable that no step uses.
struct Net {
    a: nn::Linear,
    extra: nn::Linear,
}

fn net(vs: &nn::VarStore) -> Net {
    let root = vs.root();
    let net = Net {
        a: nn::linear(&root / "a", 6, 3, Default::default()),
        extra: nn::linear(&root / "extra", 3, 3, Default::default()),
    };
    let _spare = root.zeros("spare", &[5]);
    net
}

fn net_loss(net: &Net, x: &Tensor, use_extra: bool) -> Tensor {
    let h = x.apply(&net.a).tanh();
    let h = if use_extra { net.extra.forward(&h) } else { h };
    h.square().mean(Kind::Float)
}

/// Every variable's gradient (None where undefined), in the store's order.
fn grads(vs: &nn::VarStore) -> Vec<Option<Tensor>> {
    vs.trainable_variables()
        .iter()
        .map(|p| {
            let g = p.grad();
            g.defined().then(|| g.copy())
        })
        .collect()
}

#[test]
fn gradients_are_averaged_over_two_ranks() {
    if !is_worker() {
        return run_workers("gradients_are_averaged_over_two_ranks", 2);
    }
    let dist = Dist::init(
        Device::Cpu,
        &DistOptions::default()
            .timeout(Duration::from_secs(60))
            .buckets(64, 128)
            .find_unused_parameters(true),
    )
    .unwrap();
    let rank = dist.rank();
    // Different initial values per rank: DataParallel must start both from rank 0's.
    tch::manual_seed(100 + rank as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs);
    let ddp = dist.data_parallel(&vs).unwrap();
    let (buckets, n_buckets) = ddp.buckets().unwrap();
    assert_eq!(buckets.len(), 5);
    assert!(
        n_buckets >= 2,
        "small caps give several buckets: {buckets:?}"
    );

    // The reference: the same initial parameters (rank 0's seed), both ranks' batches.
    tch::manual_seed(100);
    let ref_vs = nn::VarStore::new(Device::Cpu);
    let ref_model = net(&ref_vs);
    for (p, q) in vs
        .trainable_variables()
        .iter()
        .zip(ref_vs.trainable_variables())
    {
        assert_eq!(p, &q, "initial parameters are rank 0's");
    }
    tch::manual_seed(7);
    let global = Tensor::randn([8, 6], (Kind::Float, Device::Cpu));
    let local = global.narrow(0, 4 * rank as i64, 4);

    for step in 0..3 {
        // Step 1: the extra layer only on rank 0 (find_unused_parameters).
        let extra_here = step != 1 || rank == 0;
        for p in vs.trainable_variables() {
            p.grad().defined().then(|| p.grad().zero_());
        }
        ddp.backward(&net_loss(&model, &local, extra_here)).unwrap();
        let got = grads(&vs);

        for p in ref_vs.trainable_variables() {
            p.grad().defined().then(|| p.grad().zero_());
        }
        let ref_loss = (0..2)
            .map(|r| net_loss(&ref_model, &global.narrow(0, 4 * r, 4), step != 1 || r == 0))
            .fold(Tensor::from(0.0f32), |a, b| a + b)
            / 2.0;
        ref_loss.backward();
        let want = grads(&ref_vs);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            match (g, w) {
                (Some(g), Some(w)) => assert!(
                    g.allclose(w, 1e-5, 1e-7, false),
                    "step {step} param {i}: {g:?} vs reference {w:?}"
                ),
                (None, None) => {}
                // The spare variable has no gradient anywhere; a zeroed leftover is fine.
                (Some(g), None) => assert_eq!(g.abs().sum(Kind::Double).double_value(&[]), 0.0),
                (None, Some(_)) => panic!("step {step} param {i}: no gradient"),
            }
        }
        // Bitwise the same on both ranks.
        for g in got.iter().flatten() {
            let mut hi = g.copy();
            let mut lo = g.copy();
            dist.all_reduce(&mut hi, ReduceOp::Max).unwrap();
            dist.all_reduce(&mut lo, ReduceOp::Min).unwrap();
            assert!(hi.equal(&lo), "step {step}: gradients differ between ranks");
        }
    }
    drop(ddp);
    dist.barrier().unwrap();
}

#[test]
fn data_parallel_alone_is_plain_backward() {
    if is_worker() {
        return;
    }
    let dist = Dist::local(Device::Cpu, &DistOptions::default());
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs);
    let ddp = DataParallel::new(&dist, vs.trainable_variables()).unwrap();
    let x = Tensor::randn([4, 6], (Kind::Float, Device::Cpu));
    ddp.backward(&net_loss(&model, &x, true)).unwrap();
    let got = grads(&vs);
    for p in vs.trainable_variables() {
        p.grad().defined().then(|| p.grad().zero_());
    }
    net_loss(&model, &x, true).backward();
    for (g, w) in got.iter().zip(grads(&vs)) {
        assert_eq!(g.is_some(), w.is_some());
        if let (Some(g), Some(w)) = (g, w) {
            assert!(g.equal(&w));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Errors, not hangs

#[test]
fn a_rank_that_never_arrives_is_an_error_within_the_timeout() {
    if !is_worker() {
        // Rank 0 of 2 alone: it serves the store and waits for a peer that never comes.
        let port = free_port();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "a_rank_that_never_arrives_is_an_error_within_the_timeout",
            "--exact",
            "--nocapture",
        ])
        .env(WORKER, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        rank_env(&mut cmd, 0, 2, port);
        let (out, elapsed) = wait_limited(KillOnDrop::spawn(&mut cmd), Duration::from_secs(60));
        assert!(
            out.status.success(),
            "{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
        return;
    }
    let start = Instant::now();
    let err = Dist::init(
        Device::Cpu,
        &DistOptions::default().timeout(Duration::from_secs(3)),
    )
    .expect_err("a world of 2 with one rank");
    let elapsed = start.elapsed();
    let message = err.to_string();
    println!("{message}");
    assert_rendezvous_error(&err, &message);
    assert!(message.contains("rank 0 of 2"), "{message}");
    assert!(
        elapsed >= Duration::from_millis(2500) && elapsed < Duration::from_secs(20),
        "gave up after {elapsed:?}, timeout 3 s"
    );
}

// ---------------------------------------------------------------------------------------
// The example, alone, under torchrun, and with a rank killed

/// examples/ddp_distill, built by the cargo running this test, with the same target folder,
/// target triple (if one was given), profile and flags, so that nothing else is rebuilt.
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // The rustc next to this cargo (its toolchain's: with rustup, a bare `rustc` would be
    // the default toolchain's, not the one of `cargo +nightly`).
    let rustc = Path::new(env!("CARGO")).with_file_name("rustc");
    let rustc = if rustc.exists() {
        rustc
    } else {
        PathBuf::from("rustc")
    };
    // <target dir>/[<triple>/]<profile>/deps/<this test>
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let above = profile_dir.parent().unwrap();
    let triples = Command::new(&rustc)
        .args(["--print", "target-list"])
        .output()
        .map(|o| text(&o.stdout))
        .unwrap_or_default();
    let name = above.file_name().unwrap().to_string_lossy().into_owned();
    let triple = triples.lines().any(|t| t == name).then_some(name);
    let target_dir = if triple.is_some() {
        above.parent().unwrap()
    } else {
        above
    };
    let mut cmd = Command::new(env!("CARGO"));
    cmd.env("RUSTC", &rustc)
        .args([
            "build",
            "--quiet",
            "--example",
            "ddp_distill",
            "--target-dir",
        ])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if let Some(triple) = triple {
        cmd.arg("--target").arg(triple);
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .expect("running cargo build --example ddp_distill");
    assert!(status.success(), "cargo build --example ddp_distill failed");
    profile_dir.join("examples/ddp_distill")
}

/// torchrun from the set-up's venv, as `python -m torch.distributed.run` (the same program;
/// a venv's `torchrun` script breaks when the venv is moved).
fn torchrun() -> Command {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(python.exists(), "no .venv: run scripts/setup.sh");
    let mut cmd = Command::new(python);
    cmd.args(["-m", "torch.distributed.run"]);
    cmd
}

#[derive(Debug, PartialEq)]
struct Final {
    rank: usize,
    world: usize,
    step: usize,
    loss: f64,
    norm: f64,
    sha: String,
}

fn finals(stdout: &str) -> Vec<Final> {
    stdout
        .lines()
        .filter_map(|l| l.find("final: ").map(|i| &l[i + 7..]))
        .map(|l| {
            let field = |k: &str| {
                l.split(' ')
                    .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                    .unwrap_or_else(|| panic!("no {k} in {l:?}"))
                    .to_string()
            };
            Final {
                rank: field("rank").parse().unwrap(),
                world: field("world").parse().unwrap(),
                step: field("step").parse().unwrap(),
                loss: field("loss").parse().unwrap(),
                norm: field("param_norm").parse().unwrap(),
                sha: field("param_sha256"),
            }
        })
        .collect()
}

#[test]
fn two_ranks_under_torchrun_match_one_process() {
    if is_worker() {
        return;
    }
    let bin = example();
    let args = ["--steps", "20", "--device", "cpu"];
    let alone = KillOnDrop::spawn(
        Command::new(&bin)
            .args(args)
            .args(["--batch-per-rank", "64"])
            .env("OMP_NUM_THREADS", "1")
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .env_remove("LOCAL_RANK")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let (alone, _) = wait_limited(alone, Duration::from_secs(120));
    assert!(alone.status.success(), "{}", text(&alone.stderr));
    let one = finals(&text(&alone.stdout));
    assert_eq!(one.len(), 1, "{}", text(&alone.stdout));
    let one = &one[0];
    assert_eq!((one.rank, one.world, one.step), (0, 1, 20));

    let pair = KillOnDrop::spawn(
        torchrun()
            .args(["--standalone", "--nproc-per-node", "2", "--no-python"])
            .arg(&bin)
            .args(args)
            .args(["--batch-per-rank", "32"])
            .env("OMP_NUM_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let (pair, _) = wait_limited(pair, Duration::from_secs(180));
    assert!(
        pair.status.success(),
        "{}\n{}",
        text(&pair.stdout),
        text(&pair.stderr)
    );
    let mut two = finals(&text(&pair.stdout));
    two.sort_by_key(|f| f.rank);
    assert_eq!(two.len(), 2, "{}", text(&pair.stdout));
    println!("1 x 64: {one:?}\n2 x 32: {two:?}");
    for (r, f) in two.iter().enumerate() {
        assert_eq!((f.rank, f.world, f.step), (r, 2, 20));
    }
    assert_eq!(
        two[0].sha, two[1].sha,
        "parameters differ between the ranks"
    );
    assert_eq!((two[0].norm, two[0].loss), (two[1].norm, two[1].loss));
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
    assert!(
        rel(two[0].norm, one.norm) < 1e-5,
        "norm {} vs {}",
        two[0].norm,
        one.norm
    );
    assert!(
        rel(two[0].loss, one.loss) < 1e-5,
        "loss {} vs {}",
        two[0].loss,
        one.loss
    );
    // Training moved the parameters (a broken reduction would still make ranks agree).
    assert!(one.loss.is_finite() && one.norm > 0.0);
}

#[test]
fn a_killed_rank_gives_the_survivor_an_error_within_the_timeout() {
    if is_worker() {
        return;
    }
    let bin = example();
    let port = free_port();
    let timeout = 15;
    let spawn = |rank: usize| {
        let mut cmd = Command::new(&bin);
        cmd.args([
            "--steps",
            "1000000",
            "--batch-per-rank",
            "8",
            "--teacher-steps",
            "0",
        ])
        .args(["--device", "cpu", "--timeout-secs", &timeout.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        rank_env(&mut cmd, rank, 2, port);
        KillOnDrop::spawn(&mut cmd)
    };
    let survivor = spawn(0);
    let mut victim = spawn(1);
    // Kill rank 1 once it has trained a few steps.
    let (tx, rx) = mpsc::channel();
    let victim_out = victim.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(victim_out).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("step 5 ") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("rank 1 never reached step 5");
    victim.kill().unwrap();
    let killed_at = Instant::now();
    victim.wait().unwrap();
    let (out, _) = wait_limited(survivor, Duration::from_secs(timeout + 60));
    let after_kill = killed_at.elapsed();
    let stderr = text(&out.stderr);
    println!("survivor, {after_kill:?} after the kill:\n{stderr}");
    assert!(!out.status.success(), "the survivor went on: {stderr}");
    assert!(stderr.contains("distributed error"), "{stderr}");
    assert!(
        after_kill < Duration::from_secs(timeout + 10),
        "{after_kill:?}"
    );
}

#[test]
fn the_example_reports_a_bad_environment() {
    if is_worker() {
        return;
    }
    let bin = example();
    for (rank, world, port, var) in [
        ("2", "2", "29500", "RANK"),
        ("0", "x", "29500", "WORLD_SIZE"),
        ("0", "2", "70000", "MASTER_PORT"),
    ] {
        let out = Command::new(&bin)
            .args(["--steps", "1"])
            .env("RANK", rank)
            .env("WORLD_SIZE", world)
            .env("LOCAL_RANK", "0")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port)
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(&format!("`{var}`")), "{var}: {stderr}");
    }
}

#[test]
fn a_world_of_one_is_a_real_group() {
    if is_worker() {
        return;
    }
    // torchrun --nproc-per-node 1: a Gloo group of one, the rank serving its own store.
    let env = group_of_one();
    let options = DistOptions::default()
        .timeout(Duration::from_secs(30))
        .find_unused_parameters(true); // the store's spare variable gets no gradient
    let dist = Dist::with_env(Some(env), Device::Cpu, &options).unwrap();
    assert!(dist.is_distributed());
    let mut t = Tensor::from_slice(&[1.5f32, -2.0]);
    dist.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.5, -2.0]);
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs);
    let x = Tensor::randn([4, 6], (Kind::Float, Device::Cpu));
    net_loss(&model, &x, true).backward();
    let want = grads(&vs);
    for p in vs.trainable_variables() {
        p.grad().defined().then(|| p.grad().zero_());
    }
    let ddp = dist.data_parallel(&vs).unwrap();
    ddp.backward(&net_loss(&model, &x, true)).unwrap();
    for (g, w) in grads(&vs).iter().zip(&want) {
        assert_eq!(g.is_some(), w.is_some());
        if let (Some(g), Some(w)) = (g, w) {
            assert!(g.equal(w), "a world of one averages nothing");
        }
    }
}

#[test]
fn nccl_without_a_gpu_is_a_clear_error() {
    if tch::Cuda::is_available() || is_worker() {
        return; // the GPU script runs the NCCL path for real
    }
    let env = group_of_one();
    let options = DistOptions::default().timeout(Duration::from_secs(10));
    let err = Dist::with_env(Some(env), Device::Cuda(0), &options).expect_err("no GPU here");
    let message = err.to_string();
    println!("NCCL built: {}; {message}", Backend::Nccl.is_built());
    assert_rendezvous_error(&err, &message);
    if !Backend::Nccl.is_built() {
        assert!(message.contains("built without NCCL"), "{message}");
    }
}

/// `err` is a failed rendezvous (its `message` shown otherwise).
fn assert_rendezvous_error(err: &VidError, message: &str) {
    assert!(
        matches!(
            err,
            VidError::Distributed {
                op: "rendezvous",
                ..
            }
        ),
        "{message}"
    );
}

/// The launch environment of a group of one on the loopback, at a free port.
fn group_of_one() -> LaunchEnv {
    LaunchEnv {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
        agent_store: false,
    }
}
