//! The owner loop and one upgrade, driven through the `Spawner` seam: a
//! fake spawner whose "child" is a task playing the new generation's side
//! of the real handoff channel (with the crate's own `handoff::recv`), so
//! everything but fork+exec is the production code path — `Baton::upgrade`,
//! the owner task, admission, the handshake, promotion, rollback.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::handoff::recv::{NewSide, PeerEvent, Promotion};
use crate::handoff::send::hello;
use crate::lifecycle::Activity;
use crate::protocol::ReadyInfo;
use crate::spawn::{
    ChildProcess, ENV_HANDOFF_FD, ENV_PARENT_PID, HANDOFF_FD, SpawnSpec, Spawner, WaitFuture,
};
use crate::{Baton, Config, Error, Phase, UpgradeOptions};

/// What the fake new generation does with its end of the channel.
#[derive(Debug, Clone, Copy)]
enum Script {
    /// Exits with this code before saying anything.
    ExitBeforeReady(i32),
    /// Says hello, reports `Failed` with this reason, exits 1 a moment
    /// later (as a real one does: it reports, then returns from main).
    FailThenExit(&'static str),
    /// Says hello, takes the listeners, then hangs.
    NeverReady,
    /// Does everything right: ready, promoted, serves, leaves when the old
    /// side closes the channel or demotes it.
    Healthy,
}

/// Beyond any possible pid (`pid_max` is at most 2^22): nothing real is
/// ever signalled by mistake.
const FIRST_FAKE_PID: u32 = (1 << 22) + 1;

/// A started fake child, as the test sees it.
#[derive(Debug)]
struct ChildState {
    pid: u32,
    exit: watch::Sender<Option<ExitStatus>>,
    killed: AtomicBool,
    reaped: AtomicBool,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl ChildState {
    fn exit(&self, status: ExitStatus) {
        self.exit.send_if_modified(|e| {
            if e.is_some() {
                return false;
            }
            *e = Some(status);
            true
        });
    }
}

/// The fake `Spawner`: checks what a real child would get (the channel at
/// `HANDOFF_FD`, the environment naming it), then plays `script`.
#[derive(Debug)]
struct FakeSpawner {
    script: Script,
    next_pid: AtomicU32,
    children: Mutex<Vec<Arc<ChildState>>>,
}

impl FakeSpawner {
    fn new(script: Script) -> Arc<Self> {
        Arc::new(FakeSpawner {
            script,
            next_pid: AtomicU32::new(FIRST_FAKE_PID),
            children: Mutex::new(Vec::new()),
        })
    }

    fn children(&self) -> Vec<Arc<ChildState>> {
        self.children.lock().unwrap().clone()
    }
}

impl Spawner for FakeSpawner {
    fn spawn(&self, spec: SpawnSpec) -> io::Result<Box<dyn ChildProcess>> {
        let env = |k: &str| {
            spec.env_set
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.to_string_lossy().into_owned())
        };
        assert_eq!(env(ENV_HANDOFF_FD), Some(HANDOFF_FD.to_string()));
        assert_eq!(env(ENV_PARENT_PID), Some(std::process::id().to_string()));
        let mut fds = spec.fds;
        assert_eq!(fds.len(), 1, "only the handoff channel is placed");
        let (fd, at) = fds.remove(0);
        assert_eq!(at, HANDOFF_FD);

        let (exit, _) = watch::channel(None);
        let state = Arc::new(ChildState {
            pid: self.next_pid.fetch_add(1, Ordering::Relaxed),
            exit,
            killed: AtomicBool::new(false),
            reaped: AtomicBool::new(false),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(play(self.script, fd, Arc::clone(&state)));
        *state.task.lock().unwrap() = Some(task);
        self.children.lock().unwrap().push(Arc::clone(&state));
        Ok(Box::new(FakeChild(state)))
    }
}

/// The new generation's side, as a task.
async fn play(script: Script, fd: OwnedFd, state: Arc<ChildState>) {
    let code = match script {
        Script::ExitBeforeReady(code) => {
            drop(fd);
            code
        }
        Script::FailThenExit(reason) => {
            let (side, _listeners) = NewSide::connect(fd, |p| hello("fake", p.generation + 1))
                .await
                .unwrap();
            side.fail(reason).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            1
        }
        Script::NeverReady => {
            let (_side, _listeners) = NewSide::connect(fd, |p| hello("fake", p.generation + 1))
                .await
                .unwrap();
            std::future::pending::<()>().await;
            unreachable!()
        }
        Script::Healthy => {
            let (side, _listeners) = NewSide::connect(fd, |p| hello("fake", p.generation + 1))
                .await
                .unwrap();
            let how = side
                .ready(
                    ReadyInfo {
                        accepts_conns: false,
                    },
                    crate::protocol::Accepts::default(),
                    Duration::from_secs(600),
                    || {},
                )
                .await
                .unwrap();
            assert!(matches!(how, Promotion::Promoted { .. }), "{how:?}");
            side.confirm_serving().await;
            let (etx, mut erx) = mpsc::unbounded_channel();
            let counts = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let serve = side.receive_connections(
                None,
                Vec::new(),
                counts,
                Arc::new(Activity::default()),
                etx,
            );
            tokio::pin!(serve);
            loop {
                tokio::select! {
                    () = &mut serve => break,
                    ev = erx.recv() => if let Some(PeerEvent::Demote(_)) = ev { break },
                }
            }
            0
        }
    };
    state.exit(ExitStatus::from_raw(code << 8));
}

#[derive(Debug)]
struct FakeChild(Arc<ChildState>);

impl ChildProcess for FakeChild {
    fn pid(&self) -> u32 {
        self.0.pid
    }

    fn kill(&mut self) -> io::Result<()> {
        if self.0.reaped.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(3)); // ESRCH
        }
        self.0.killed.store(true, Ordering::SeqCst);
        // A killed process's end of the channel closes with it.
        if let Some(t) = self.0.task.lock().unwrap().take() {
            t.abort();
        }
        self.0.exit(ExitStatus::from_raw(9)); // SIGKILL
        Ok(())
    }

    fn wait(&mut self) -> WaitFuture<'_> {
        let state = Arc::clone(&self.0);
        Box::pin(async move {
            let mut rx = state.exit.subscribe();
            let st = rx
                .wait_for(Option::is_some)
                .await
                .map(|e| e.unwrap_or_default())
                .map_err(io::Error::other)?;
            state.reaped.store(true, Ordering::SeqCst);
            Ok(st)
        })
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let st = *self.0.exit.borrow();
        if st.is_some() {
            self.0.reaped.store(true, Ordering::SeqCst);
        }
        Ok(st)
    }
}

/// A first generation that serves, with the fake spawner and nothing that
/// reaches outside the process (no signal handler, no systemd, no control
/// socket, no memory admission).
async fn serving(spawner: Arc<FakeSpawner>, tweak: impl FnOnce(&mut Config)) -> Baton {
    let mut config = Config {
        // Any executable file passes the pre-flight; the fake never runs it.
        executable: Some(std::env::current_exe().unwrap()),
        upgrade_on_sigusr2: false,
        systemd_notify: false,
        ..Config::default()
    };
    config.memory.enabled = false;
    tweak(&mut config);
    let baton = Baton::start_with_spawner(config, spawner).await.unwrap();
    baton.ready().await.unwrap();
    assert_eq!(baton.phase(), Phase::Serving);
    baton
}

/// After a failed upgrade: this generation serves, nothing is left behind,
/// the failure is on record.
async fn assert_rolled_back(baton: &Baton, spawner: &FakeSpawner) {
    assert_eq!(baton.phase(), Phase::Serving);
    for c in spawner.children() {
        assert!(
            c.reaped.load(Ordering::SeqCst),
            "child {} not reaped",
            c.pid
        );
    }
    let status = baton.status().await;
    assert!(!status.upgrade_in_progress);
    assert_eq!(status.counters.upgrades_failed, 1);
    assert_eq!(status.counters.upgrades_succeeded, 0);
    let last = status.last_upgrade.expect("a last upgrade");
    assert_eq!(last.result, "failed");
    assert!(last.reason.is_some());
}

/// The harness itself: against a new side that does everything right, the
/// upgrade succeeds and this generation is done.
#[tokio::test]
async fn upgrade_succeeds_against_a_healthy_new_generation() {
    let spawner = FakeSpawner::new(Script::Healthy);
    let baton = serving(Arc::clone(&spawner), |_| {}).await;
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        baton.upgrade(UpgradeOptions::default()),
    )
    .await
    .expect("the upgrade ends")
    .unwrap();
    assert_eq!(report.from_generation, 1);
    assert_eq!(report.to_generation, 2);
    assert_eq!(report.new_pid, FIRST_FAKE_PID);
    assert_eq!(spawner.children().len(), 1);
    baton.done().await;
    assert_eq!(baton.phase(), Phase::Done);
}

/// One owner, one upgrade: a second request while one runs is answered
/// "in progress" at once and starts nothing.
#[tokio::test(start_paused = true)]
async fn a_second_upgrade_while_one_runs_is_in_progress() {
    let spawner = FakeSpawner::new(Script::NeverReady);
    let baton = serving(Arc::clone(&spawner), |_| {}).await;
    let b = baton.clone();
    let first = tokio::spawn(async move { b.upgrade(UpgradeOptions::default()).await });
    tokio::time::timeout(Duration::from_secs(5), async {
        while spawner.children().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the first upgrade spawns its child");
    assert!(baton.status().await.upgrade_in_progress);

    match baton.upgrade(UpgradeOptions::default()).await {
        Err(Error::InProgress(m)) => assert!(m.contains("running"), "{m}"),
        other => panic!("expected InProgress, got {other:?}"),
    }
    assert_eq!(
        spawner.children().len(),
        1,
        "the second request started nothing"
    );

    // The first one still ends (at its ready timeout) and rolls back.
    let res = first.await.unwrap();
    assert!(matches!(res, Err(Error::Failed(_))), "{res:?}");
    assert_rolled_back(&baton, &spawner).await;
}

/// A child that exits before it is ready: rolled back with the reason (its
/// exit status), this generation still serving.
#[tokio::test(start_paused = true)]
async fn a_child_that_exits_before_ready_is_rolled_back_with_the_reason() {
    let spawner = FakeSpawner::new(Script::ExitBeforeReady(3));
    let baton = serving(Arc::clone(&spawner), |_| {}).await;
    match baton.upgrade(UpgradeOptions::default()).await {
        Err(Error::Failed(m)) => {
            assert!(m.contains(&format!("pid {FIRST_FAKE_PID}")), "{m}");
            assert!(m.contains("exit code 3"), "{m}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    let c = &spawner.children()[0];
    assert!(!c.killed.load(Ordering::SeqCst), "it exited by itself");
    assert_rolled_back(&baton, &spawner).await;
}

/// A child that reports `Failed` gets its reason through, and a moment to
/// exit by itself: the report shows its own exit status, not a SIGKILL.
#[tokio::test(start_paused = true)]
async fn a_child_that_reports_failure_exits_by_itself_and_its_reason_is_reported() {
    let spawner = FakeSpawner::new(Script::FailThenExit("no config file"));
    let baton = serving(Arc::clone(&spawner), |_| {}).await;
    match baton.upgrade(UpgradeOptions::default()).await {
        Err(Error::Failed(m)) => {
            assert!(
                m.contains("the new generation reported a failure: no config file"),
                "{m}"
            );
            assert!(m.contains("exit code 1"), "{m}");
            assert!(!m.contains("SIGKILL"), "{m}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert!(!spawner.children()[0].killed.load(Ordering::SeqCst));
    assert_rolled_back(&baton, &spawner).await;
}

/// Readiness is bounded: a child that never becomes ready is killed at the
/// ready timeout, and reaped.
#[tokio::test(start_paused = true)]
async fn a_child_that_never_becomes_ready_is_killed_at_the_ready_timeout_and_reaped() {
    const READY_TIMEOUT: Duration = Duration::from_secs(7);
    let spawner = FakeSpawner::new(Script::NeverReady);
    let baton = serving(Arc::clone(&spawner), |c| c.ready_timeout = READY_TIMEOUT).await;
    let t0 = tokio::time::Instant::now();
    match baton.upgrade(UpgradeOptions::default()).await {
        Err(Error::Failed(m)) => {
            assert!(m.contains("was not ready within 7s (ready timeout)"), "{m}");
            assert!(m.contains("stopped with SIGKILL"), "{m}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    let waited = t0.elapsed();
    assert!(
        waited >= READY_TIMEOUT && waited < READY_TIMEOUT + Duration::from_secs(1),
        "{waited:?}"
    );
    let c = &spawner.children()[0];
    assert!(c.killed.load(Ordering::SeqCst), "killed");
    assert!(c.reaped.load(Ordering::SeqCst), "reaped");
    assert_rolled_back(&baton, &spawner).await;
}

/// A health endpoint answering every request with `status`; counts them.
async fn health_server(status: &'static str) -> (String, Arc<AtomicU32>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/health", l.local_addr().unwrap());
    let hits = Arc::new(AtomicU32::new(0));
    let h = Arc::clone(&hits);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await;
            h.fetch_add(1, Ordering::SeqCst);
            let answer =
                format!("HTTP/1.1 {status}\r\nlocation: /elsewhere\r\ncontent-length: 0\r\n\r\n");
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    (url, hits)
}

/// An observation window with a health check of `status` on a healthy
/// new side.
async fn observed_upgrade(
    status: &'static str,
) -> (
    Baton,
    Arc<FakeSpawner>,
    Result<crate::UpgradeReport, Error>,
    u32,
) {
    let (url, hits) = health_server(status).await;
    let spawner = FakeSpawner::new(Script::Healthy);
    let baton = serving(Arc::clone(&spawner), |c| {
        c.observe = Duration::from_millis(600);
        c.health_url = Some(url);
        c.health_interval = Duration::from_millis(50);
    })
    .await;
    let res = tokio::time::timeout(
        Duration::from_secs(30),
        baton.upgrade(UpgradeOptions::default()),
    )
    .await
    .expect("the upgrade ends");
    let hits = hits.load(Ordering::SeqCst);
    (baton, spawner, res, hits)
}

/// The window's health check counts a redirect as healthy (200–399, as
/// Kubernetes probes do): the new generation stays.
#[tokio::test]
async fn the_observation_window_keeps_a_new_generation_whose_health_redirects() {
    let (baton, _spawner, res, hits) = observed_upgrade("302 Found").await;
    assert!(hits >= 2, "the health URL was checked ({hits} times)");
    assert_eq!(res.unwrap().to_generation, 2);
    baton.done().await;
}

/// A 4xx or a 5xx from the health URL fails the window: rolled back.
#[tokio::test]
async fn the_observation_window_rolls_back_a_new_generation_whose_health_fails() {
    for status in ["404 Not Found", "503 Service Unavailable"] {
        let (baton, spawner, res, hits) = observed_upgrade(status).await;
        assert!(hits >= 2, "{status}: checked {hits} times");
        match res {
            Err(Error::Failed(m)) => {
                assert!(m.contains("health check"), "{m}");
                assert!(m.contains("failed 2 times in a row"), "{m}");
                assert!(m.contains(status), "{m}");
            }
            other => panic!("{status}: expected Failed, got {other:?}"),
        }
        assert_rolled_back(&baton, &spawner).await;
    }
}
