//! Issue 19: fleet rollouts through the engines fleets already run.
//!
//! * The example Ansible play (`contrib/ansible/rollout.yml`, the
//!   `baton.fleet` collection) against three hosts that are three fixture
//!   instances on this machine, under a no-retry load on each.
//! * The `baton_upgrade` / `baton_status` modules' exit-code mapping, one
//!   outcome at a time.
//! * The Kubernetes sidecar's watch → deliver → verify → upgrade loop.
//! * The Kubernetes manifests against the Kubernetes schemas.

use std::path::Path;
use std::time::Duration;

use baton_tests::fleet::{self, Ansible, Host, PacedLoad, Release, play_recap};
use baton_tests::load::Stats;
use baton_tests::{TestDir, apps};
use serde_json::json;

const FIXTURE: &str = env!("CARGO_BIN_EXE_baton-fixture");
const FIXTURE_V2: &str = env!("CARGO_BIN_EXE_baton-fixture-v2");
/// The version string each fixture binary serves at `/version`.
const V1: &str = baton_demo::VERSION;
const V2: &str = "2.0.0-fixture";
/// Bound on one ansible-playbook run.
const PLAY_TIMEOUT: Duration = Duration::from_secs(180);
const T: Duration = Duration::from_secs(60);

/// The no-retry load on one host: four keep-alive clients, a request every
/// 20 ms each (paced: see `PacedLoad`), bounded in time.
fn load_on(h: &Host) -> PacedLoad {
    PacedLoad::start(
        h.addr,
        4,
        Duration::from_millis(20),
        Duration::from_secs(300),
    )
}

fn assert_no_failed_request(name: &str, s: &Stats) {
    assert!(s.ok > 0, "{name}: no request answered: {s:?}");
    assert_eq!(
        (s.failed, s.wrong),
        (0, 0),
        "{name}: every request must succeed: {s:?}"
    );
}

/// The inventory: three hosts, each a fixture instance with its own
/// port, control socket and release directory, all `ansible_connection:
/// local`.
fn inventory(dir: &Path, hosts: &[Host]) -> std::path::PathBuf {
    let mut hs = serde_json::Map::new();
    for h in hosts {
        hs.insert(
            h.name.clone(),
            json!({
                "baton_app_root": h.root,
                "baton_control": h.control,
                "baton_verify_url": format!("http://{}/version", h.addr),
            }),
        );
    }
    let inv = json!({
        "web": {
            "hosts": hs,
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": Ansible::python(),
                "baton_binary_name": fleet::BINARY_NAME,
                "baton_bin": apps::baton_bin(),
            }
        }
    });
    let p = dir.join("inventory.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&inv).unwrap()).unwrap();
    p
}

/// What a host looks like from outside: serving pid, generation, version,
/// where `current` points, which releases are on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    pid: u32,
    generation: u64,
    version: String,
    current: String,
    releases: Vec<String>,
}

fn seen(h: &Host) -> Seen {
    let v = h.version();
    let st = h.status();
    assert_eq!((st.pid, st.generation), (v.pid, v.generation), "{}", h.name);
    Seen {
        pid: v.pid,
        generation: v.generation,
        version: v.version,
        current: h.current(),
        releases: h.releases(),
    }
}

/// Three hosts running release 1 (V1), release 2 (V2) ready to roll out,
/// the inventory, and ansible.
struct Fleet {
    // Before `dir`: the hosts' processes are killed before their files go.
    hosts: Vec<Host>,
    dir: TestDir,
    inventory: std::path::PathBuf,
    ansible: Ansible,
    v2: Release,
}

impl Fleet {
    fn new(name: &str) -> Fleet {
        let dir = TestDir::new(name);
        let dist = dir.join("dist");
        std::fs::create_dir_all(&dist).unwrap();
        let v1 = Release::stripped(Path::new(FIXTURE), &dist, "server-v1", V1);
        let v2 = Release::stripped(Path::new(FIXTURE_V2), &dist, "server-v2", V2);
        let hosts: Vec<Host> = (1..=3)
            .map(|i| {
                let name = format!("host{i}");
                Host::start(&name, &dir.join(&name), &v1)
            })
            .collect();
        let inventory = inventory(&dir.path, &hosts);
        let ansible = Ansible::new(&dir.join("ansible"));
        Fleet {
            hosts,
            dir,
            inventory,
            ansible,
            v2,
        }
    }

    /// `ansible-playbook -i INVENTORY rollout.yml --diff` rolling out
    /// release 2, with `extra` variables and `args`.
    fn play(&self, tag: &str, extra: serde_json::Value, args: &[&str]) -> fleet::Run {
        let mut vars = json!({
            "baton_release_version": V2,
            "baton_release_src": self.v2.path,
            "baton_release_sha256": self.v2.sha256,
            "baton_in_progress_delay": 1,
        });
        if let (Some(v), Some(e)) = (vars.as_object_mut(), extra.as_object()) {
            v.extend(e.clone());
        }
        let mut c = self.ansible.command("ansible-playbook");
        c.arg("-i")
            .arg(&self.inventory)
            .arg(Ansible::rollout_play())
            .arg("--diff")
            .arg("-e")
            .arg(vars.to_string())
            .args(args);
        let run = fleet::run_bounded(&mut c, &self.dir.path, tag, PLAY_TIMEOUT);
        eprintln!(
            "----- {tag}: exit {} in {:?}\n{}\n{}",
            run.code(),
            run.elapsed,
            run.stdout,
            run.stderr
        );
        run
    }
}

/// The recap of a play that upgraded host1 and failed on host2 (rolled
/// back, `current` flipped back by the rescue), never reaching host3.
fn recap_host1_upgraded_host2_failed() -> std::collections::BTreeMap<String, fleet::Recap> {
    [
        (
            "host1".to_owned(),
            fleet::Recap {
                ok: 7,
                changed: 4,
                ..Default::default()
            },
        ),
        (
            "host2".to_owned(),
            fleet::Recap {
                ok: 6,
                changed: 4,
                failed: 1,
                rescued: 1,
                ..Default::default()
            },
        ),
    ]
    .into_iter()
    .collect()
}

/// The fault that makes host2's next generation fail its readiness.
const HOST2_REASON: &str =
    "release 2.0.0-fixture cannot read /etc/myapp/db.conf (fault armed by the fleet test)";

#[test]
fn the_example_play_upgrades_host1_rolls_back_host2_and_stops_before_host3_with_no_failed_request()
{
    let f = Fleet::new("fleet-play");
    let hosts = &f.hosts;
    let v1_seen: Vec<Seen> = hosts.iter().map(seen).collect();
    for s in &v1_seen {
        assert_eq!((s.version.as_str(), s.generation), (V1, 1));
        assert_eq!(s.current, format!("releases/{V1}"));
    }

    // Check mode: every host reports what would change, nothing does.
    let check = f.play("play-check", json!({}), &["--check"]);
    assert_eq!(check.code(), 0, "the check run must succeed");
    let recap = play_recap(&check.stdout);
    let would = fleet::Recap {
        ok: 6,
        changed: 4,
        skipped: 1,
        ..Default::default()
    };
    for h in hosts {
        assert_eq!(
            recap.get(&h.name),
            Some(&would),
            "check-mode recap: {recap:?}"
        );
    }
    assert_eq!(recap.len(), 3, "{recap:?}");
    // baton_upgrade's diff in check mode, once per host.
    for s in &v1_seen {
        let d = format!(
            "-version: {V1}\n-pid: {}\n-generation: 1\n\
             +version: (the new executable's)\n+pid: (new)\n+generation: 2\n",
            s.pid
        );
        assert!(check.stdout.contains(&d), "check-mode diff {d:?}");
    }
    let after_check: Vec<Seen> = hosts.iter().map(seen).collect();
    assert_eq!(after_check, v1_seen, "check mode changed nothing");

    // Host 2's next generation will fail its readiness (the fixture reads
    // the fault at its start): a release that does not come up there.
    let reason =
        "release 2.0.0-fixture cannot read /etc/myapp/db.conf (fault armed by the fleet test)";
    hosts[1].arm_fault(&format!("fail-ready:{reason}"));

    let loads: Vec<PacedLoad> = hosts.iter().map(load_on).collect();
    for l in &loads {
        l.wait_progress(20, T);
    }
    let run = f.play("play", json!({}), &[]);
    // The load goes on past the end of the play.
    for l in &loads {
        l.wait_progress(20, T);
    }
    let stats: Vec<Stats> = loads.into_iter().map(PacedLoad::stop).collect();
    for (h, s) in hosts.iter().zip(&stats) {
        eprintln!(
            "{}: load {} ok, {} failed, {} wrong, pids {:?}",
            h.name, s.ok, s.failed, s.wrong, s.pids
        );
    }

    // ansible-playbook exits 2 when a host failed; the recap says exactly:
    // host1 upgraded (4 changes: directory, binary, current, upgrade), host2
    // failed after its rescue flipped `current` back, host3 never ran.
    assert_eq!(run.code(), 2, "the play must fail (host2)");
    let recap = play_recap(&run.stdout);
    let expected = recap_host1_upgraded_host2_failed();
    assert_eq!(recap, expected, "the play recap");
    assert!(
        run.stdout.contains(reason),
        "the play output gives host2's reason"
    );

    // host1: the new version serves, from a new process, through `current`.
    let s1 = seen(&hosts[0]);
    assert_eq!(
        (s1.version.as_str(), s1.generation, s1.current.as_str()),
        (V2, 2, format!("releases/{V2}").as_str())
    );
    assert_ne!(s1.pid, v1_seen[0].pid);
    assert_eq!(s1.releases, [V1.to_owned(), V2.to_owned()]);
    assert_eq!(
        stats[0].pids,
        [v1_seen[0].pid, s1.pid].into_iter().collect(),
        "host1's load ran across the upgrade"
    );
    // host2: rolled back: the same process serves the old version, `current`
    // points at the old release again; the release was delivered.
    let s2 = seen(&hosts[1]);
    assert_eq!(
        s2,
        Seen {
            releases: vec![V1.to_owned(), V2.to_owned()],
            ..v1_seen[1].clone()
        }
    );
    let last = hosts[1]
        .status()
        .last_upgrade
        .expect("host2's last upgrade");
    assert_eq!(last.result, "failed");
    assert!(
        last.reason.as_deref().unwrap_or_default().contains(reason),
        "{last:?}"
    );
    // Every keep-alive connection of host1's load moved to the new
    // generation (which counts what it received); none was closed.
    let counters = hosts[0].status().counters;
    assert_eq!(
        (
            counters.conns_received,
            counters.conns_closed_at_deadline,
            stats[0].closes
        ),
        (4, 0, 0),
        "host1: each of the 4 load connections handed over: {counters:?}"
    );
    // host3: untouched.
    assert_eq!(seen(&hosts[2]), v1_seen[2]);
    assert_eq!(hosts[2].processes(), [v1_seen[2].pid]);
    assert!(hosts[2].status().last_upgrade.is_none());
    for (h, s) in hosts.iter().zip(&stats) {
        assert_no_failed_request(&h.name, s);
    }
}

/// A batch of two: host1 and host2 roll together; host2 fails, which is
/// half the batch: `max_fail_percentage: 0` stops the play there (without
/// it, Ansible would go on to host3's batch).
#[test]
fn with_batches_of_two_the_play_stops_after_the_batch_with_a_failed_host() {
    let f = Fleet::new("fleet-batch");
    let host3 = seen(&f.hosts[2]);
    f.hosts[1].arm_fault(&format!("fail-ready:{HOST2_REASON}"));
    let run = f.play("play-batch", json!({"baton_serial": 2}), &[]);
    assert_eq!(run.code(), 2, "the play must fail (host2)");
    assert_eq!(
        play_recap(&run.stdout),
        recap_host1_upgraded_host2_failed(),
        "the play recap"
    );
    assert_eq!(f.hosts[0].version().version, V2);
    assert_eq!(f.hosts[1].version().version, V1);
    assert_eq!(seen(&f.hosts[2]), host3, "host3 untouched");
}

/// `baton` wrapped in a script that appends `SUBCOMMAND EXIT-CODE` to `log`
/// after each run, so the test sees each attempt the module makes.
fn logging_baton(dir: &Path, log: &Path) -> std::path::PathBuf {
    let p = dir.join("baton-logged");
    let script = format!(
        "#!/bin/sh\n'{}' \"$@\"\nrc=$?\necho \"$1 $rc\" >> '{}'\nexit $rc\n",
        apps::baton_bin().display(),
        log.display()
    );
    baton_tests::write_exe(&p, script.as_bytes());
    p
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_modules_map_each_baton_outcome_to_an_ansible_result() {
    let dir = TestDir::new("fleet-modules");
    let v1 = Release::stripped(Path::new(FIXTURE), &dir.path, "server-v1", V1);
    let v2 = Release::stripped(Path::new(FIXTURE_V2), &dir.path, "server-v2", V2);
    let host = Host::start("host", &dir.join("host"), &v1);
    let ansible = Ansible::new(&dir.join("ansible"));
    let ctl = host.control.display().to_string();
    let baton = apps::baton_bin().display().to_string();

    // The documentation of both modules parses.
    let mut doc = ansible.command("ansible-doc");
    doc.args([
        "-t",
        "module",
        "baton.fleet.baton_upgrade",
        "baton.fleet.baton_status",
    ]);
    let doc = fleet::run_bounded(&mut doc, &dir.path, "ansible-doc", Duration::from_secs(60));
    assert_eq!(doc.code(), 0, "ansible-doc: {}\n{}", doc.stdout, doc.stderr);
    for m in ["baton_upgrade", "baton_status"] {
        assert!(
            doc.stdout.contains(&format!("MODULE baton.fleet.{m} ")),
            "{}",
            doc.stdout
        );
    }

    // baton_status: the status object, as a result and as a fact.
    let r = ansible.module(
        "status",
        "baton.fleet.baton_status",
        &json!({"control": ctl, "baton": baton}),
        false,
    );
    assert_eq!(r.word, "SUCCESS", "{:#}", r.json);
    let pid1 = host.version().pid;
    assert_eq!(r.json["status"]["generation"], 1);
    assert_eq!(r.json["status"]["pid"], pid1);
    assert_eq!(r.json["ansible_facts"]["baton_status"]["app_version"], V1);

    // No server at the socket: failed, cannot_connect.
    let r = ansible.module(
        "cannot-connect",
        "baton.fleet.baton_upgrade",
        &json!({"control": dir.join("nothing/here.sock"), "baton": baton}),
        false,
    );
    assert_eq!(
        (r.word.as_str(), &r.json["result"]),
        ("FAILED!", &json!("cannot_connect")),
        "{:#}",
        r.json
    );

    // Hold an upgrade open (its new generation waits for `gate` to be
    // ready): the modules meet "another upgrade is in progress" (exit 4).
    fleet::install(&host.root, &v2);
    fleet::flip_current(&host.root, V2);
    let gate = dir.join("gate");
    host.arm_fault(&format!("ready-when:{}", gate.display()));
    let held = {
        let ctl = host.control.clone();
        std::thread::spawn(move || baton_tests::control_upgrade(&ctl))
    };
    baton_tests::wait_for(T, "the held upgrade", || {
        baton_tests::try_control_status(&host.control)
            .filter(|s| s.upgrade_in_progress)
            .map(|_| ())
    });

    // Retries exhausted: 1 try + 2 retries, then failed with in_progress.
    let log = dir.join("calls-exhausted");
    let r = ansible.module(
        "in-progress-exhausted",
        "baton.fleet.baton_upgrade",
        &json!({"control": ctl, "baton": logging_baton(&dir.path, &log), "retries": 2, "delay": 0.1}),
        false,
    );
    assert_eq!(r.word, "FAILED!", "{:#}", r.json);
    assert_eq!(
        (&r.json["result"], &r.json["attempts"], &r.json["exit_code"]),
        (&json!("in_progress"), &json!(3), &json!(4))
    );
    assert!(
        r.json["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("after 3 tries"),
        "{:#}",
        r.json
    );
    assert_eq!(
        lines(&log),
        [
            "status 0",
            "upgrade 4",
            "upgrade 4",
            "upgrade 4",
            "status 0"
        ]
    );

    // Retried until the other upgrade is done, then upgraded: the test
    // opens the gate once the module has met exit 4 at least once.
    let log = dir.join("calls-retried");
    let wrapper = logging_baton(&dir.path, &log);
    let module = {
        let (ansible, ctl) = (
            Ansible {
                dir: ansible.dir.clone(),
            },
            ctl.clone(),
        );
        std::thread::spawn(move || {
            ansible.module(
                "in-progress-retried",
                "baton.fleet.baton_upgrade",
                &json!({"control": ctl, "baton": wrapper, "retries": 100, "delay": 0.1}),
                false,
            )
        })
    };
    baton_tests::wait_for(T, "the module to meet exit 4", || {
        lines(&log).iter().any(|l| l == "upgrade 4").then_some(())
    });
    std::fs::write(&gate, "").unwrap();
    match held.join().unwrap() {
        baton::control::Reply::Upgraded(r) => assert_eq!(r.to_generation, 2),
        other => panic!("the held upgrade: {other:?}"),
    }
    let r = module.join().unwrap();
    assert_eq!(r.word, "CHANGED", "{:#}", r.json);
    assert_eq!(r.json["result"], "upgraded");
    let tries = r.json["attempts"].as_u64().unwrap_or_default();
    assert!(tries >= 2, "{:#}", r.json);
    let st = host.status();
    assert_eq!((st.generation, st.app_version.as_str()), (3, V2));
    assert_eq!(
        r.json["before"],
        json!({"version": V1, "pid": pid1, "generation": 1})
    );
    assert_eq!(
        r.json["after"],
        json!({"version": V2, "pid": st.pid, "generation": 3})
    );
    assert_eq!(r.json["report"]["to_generation"], 3);
    let mut want = vec!["status 0".to_owned()];
    want.extend((1..tries).map(|_| "upgrade 4".to_owned()));
    want.extend(["upgrade 0".to_owned(), "status 0".to_owned()]);
    assert_eq!(lines(&log), want);

    // Already running the expected content: ok, not changed, no upgrade.
    let r = ansible.module(
        "unchanged",
        "baton.fleet.baton_upgrade",
        &json!({"control": ctl, "baton": baton, "expect_sha256": v2.sha256}),
        false,
    );
    assert_eq!(
        (r.word.as_str(), &r.json["result"]),
        ("SUCCESS", &json!("unchanged")),
        "{:#}",
        r.json
    );
    assert_eq!(r.json["running_sha256"], v2.sha256.as_str());

    // Another SHA-256 than the file's: baton refuses (exit 3), nothing
    // starts, the task fails with baton's reason.
    let wrong = "0".repeat(64);
    let r = ansible.module(
        "refused",
        "baton.fleet.baton_upgrade",
        &json!({"control": ctl, "baton": baton, "expect_sha256": wrong}),
        false,
    );
    assert_eq!(r.word, "FAILED!", "{:#}", r.json);
    assert_eq!(
        (&r.json["result"], &r.json["exit_code"]),
        (&json!("refused"), &json!(3))
    );
    let msg = r.json["msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("expected {wrong}")) && msg.contains("nothing was started"),
        "{msg}"
    );
    let after = host.status();
    assert_eq!(
        (after.generation, after.pid),
        (3, st.pid),
        "a refusal changes nothing"
    );
}

/// The release marker for `release` named `name` (the sidecar's format, as
/// a ConfigMap value would hold it).
fn marker(name: &str, sha256: &str, source: &Path) -> String {
    format!(
        "# written by the fleet test\nrelease={name}\nsha256={sha256}\nsource=file://{}\n",
        source.display()
    )
}

/// The sidecar, killed on drop.
struct Sidecar(std::process::Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = baton_tests::wait_owned(&mut self.0, Duration::from_secs(5));
    }
}

/// The status file once it is about `release` and no longer `retrying`
/// (or `starting`).
fn settled(status: &Path, release: &str) -> serde_json::Value {
    baton_tests::wait_for(
        T,
        &format!("the sidecar to settle on release {release}"),
        || {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(status).ok()?).ok()?;
            let done = v["release"] == release
                && !matches!(v["state"].as_str(), Some("retrying" | "starting"));
            done.then_some(v)
        },
    )
}

/// `baton-sidecar probe --status STATUS ARGS...`: exit code and output.
fn probe(dir: &Path, status: &Path, args: &[&str]) -> (i32, String) {
    let mut c = std::process::Command::new(fleet::sidecar_bin());
    c.arg("probe").arg("--status").arg(status).args(args);
    let r = fleet::run_bounded(&mut c, dir, "probe", Duration::from_secs(30));
    (r.code(), r.stdout)
}

#[test]
fn the_sidecar_upgrades_when_the_marker_changes_refuses_a_wrong_sha256_and_reports_a_rollback() {
    let dir = TestDir::new("fleet-sidecar");
    // The volume releases come from, and the pod's shared app directory.
    let dist = dir.join("dist");
    std::fs::create_dir_all(&dist).unwrap();
    let v1 = Release::stripped(Path::new(FIXTURE), &dist, "server-v1", V1);
    let v2 = Release::stripped(Path::new(FIXTURE_V2), &dist, "server-v2", V2);
    let app = dir.join("app");
    let status = dir.join("sidecar/status.json");
    let mut cm = fleet::ConfigMapVolume::new(&dir.join("release-config"));
    cm.write(&[("release", &marker("1", &v1.sha256, &v1.path))]);

    let mut cmd = std::process::Command::new(fleet::sidecar_bin());
    cmd.arg("watch")
        .arg("--marker")
        .arg(cm.path("release"))
        .arg("--app-dir")
        .arg(&app)
        .arg("--binary")
        .arg(fleet::BINARY_NAME)
        .arg("--control")
        .arg(app.join("ctl/control.sock"))
        .arg("--status")
        .arg(&status)
        .args([
            "--poll",
            "50ms",
            "--retry-after",
            "500ms",
            "--upgrade-timeout",
            "60s",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("sidecar.log")).unwrap());
    let sidecar = Sidecar(baton_tests::spawn_owned(&mut cmd).unwrap());
    let sidecar_log = || std::fs::read_to_string(dir.join("sidecar.log")).unwrap_or_default();

    // The pod starts: the sidecar delivers release 1 first (its startup
    // probe passes), then the server starts from `current`.
    let st = settled(&status, "1");
    assert_eq!(st["state"], "delivered", "{st:#}");
    assert_eq!(probe(&dir.path, &status, &["--serving"]).0, 0);
    let host = Host::start_current("pod", &app);
    let first = host.version();
    assert_eq!((first.version.as_str(), first.generation), (V1, 1));

    let load = PacedLoad::start(
        host.addr,
        4,
        Duration::from_millis(20),
        Duration::from_secs(120),
    );
    load.wait_progress(20, T);

    // Release 2: delivered, verified, current flipped, upgraded in place.
    cm.write(&[("release", &marker("2", &v2.sha256, &v2.path))]);
    let st = settled(&status, "2");
    assert_eq!(st["state"], "upgraded", "{st:#}\n{}", sidecar_log());
    let second = host.version();
    assert_eq!((second.version.as_str(), second.generation), (V2, 2));
    assert_eq!(st["serving"], json!({"release": "2", "sha256": v2.sha256}));
    assert_eq!(st["upgrade"]["new_pid"], second.pid);
    assert_eq!(host.current(), "releases/2");
    assert_eq!(host.releases(), ["1", "2"]);
    let (code, out) = probe(&dir.path, &status, &["--release", "2"]);
    assert_eq!(code, 0, "{out}");
    load.wait_progress(20, T);

    // Release 3's marker pins another SHA-256 than its binary's: refused,
    // nothing delivered, nothing changed.
    cm.write(&[("release", &marker("3", &v2.sha256, &v1.path))]);
    let st = settled(&status, "3");
    assert_eq!(st["state"], "refused", "{st:#}");
    let msg = st["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("is {}, the marker says {}", v1.sha256, v2.sha256)),
        "{msg}"
    );
    let (code, out) = probe(&dir.path, &status, &["--release", "3"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not delivered"), "the probe says why: {out}");
    assert_eq!(host.version().pid, second.pid);
    assert_eq!(host.current(), "releases/2");
    assert_eq!(host.releases(), ["1", "2"]);

    // Release 4 fails its readiness: rolled back, `current` back at 2,
    // reported with the reason.
    let reason = "release 4 cannot open its database (fault armed by the fleet test)";
    host.arm_fault(&format!("fail-ready:{reason}"));
    cm.write(&[("release", &marker("4", &v1.sha256, &v1.path))]);
    let st = settled(&status, "4");
    assert_eq!(st["state"], "rolled_back", "{st:#}");
    let msg = st["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(reason) && msg.contains("current points back at releases/2"),
        "{msg}"
    );
    let (code, out) = probe(&dir.path, &status, &["--release", "4"]);
    assert!(code == 1 && out.contains(reason), "{code}: {out}");
    assert_eq!(
        probe(&dir.path, &status, &["--release", "2"]).0,
        0,
        "2 still serves"
    );
    let now = host.version();
    assert_eq!((now.pid, now.version.as_str()), (second.pid, V2));
    assert_eq!(host.current(), "releases/2");
    load.wait_progress(20, T);

    let stats = load.stop();
    eprintln!(
        "load: {} ok, {} failed, pids {:?}",
        stats.ok, stats.failed, stats.pids
    );
    assert_no_failed_request("pod", &stats);
    assert_eq!(stats.pids, [first.pid, second.pid].into_iter().collect());
    let states: Vec<&str> = st["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["state"].as_str())
        .collect();
    assert_eq!(
        states,
        ["delivered", "upgraded", "refused", "rolled_back"],
        "{st:#}"
    );
    assert_eq!(
        probe(&dir.path, &status, &["--max-age", "10s"]).0,
        0,
        "the liveness probe"
    );

    // The sidecar container restarts: it resumes from its status file and
    // acts on nothing it already acted on — release 4 is not retried, no
    // generation starts.
    drop(sidecar);
    let restarted_at = json!(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    );
    cmd.stderr(std::fs::File::create(dir.join("sidecar-2.log")).unwrap());
    let _sidecar = Sidecar(baton_tests::spawn_owned(&mut cmd).unwrap());
    let beat = |after: u64| {
        baton_tests::wait_for(T, "a heartbeat of the restarted sidecar", || {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&status).ok()?).ok()?;
            let h = v["heartbeat_unix_ms"].as_u64()?;
            (h > after).then_some((h, v))
        })
    };
    // The first write is at start, the second after its first poll.
    let (h1, _) = beat(restarted_at.as_u64().unwrap());
    let (_, st) = beat(h1);
    assert_eq!(
        (&st["state"], &st["release"]),
        (&json!("rolled_back"), &json!("4")),
        "{st:#}"
    );
    let log2 = std::fs::read_to_string(dir.join("sidecar-2.log")).unwrap_or_default();
    assert!(log2.contains("resuming: RolledBack for 4"), "{log2}");
    let after = host.status();
    assert_eq!((after.generation, after.pid), (2, second.pid));
    assert_eq!(host.current(), "releases/2");
}

/// `argv` (a manifest's command line) with `--help` put before its `--`
/// (or at the end): clap then checks every flag's name and value and
/// exits 0 without running anything, or exits 2 naming what is wrong.
fn with_help(argv: &[String]) -> Vec<String> {
    let mut v = argv.to_vec();
    let at = v.iter().position(|a| a == "--").unwrap_or(v.len());
    v.insert(at, "--help".into());
    v
}

#[test]
fn the_kubernetes_manifests_match_the_schemas_and_the_programs_they_run() {
    let dir = TestDir::new("fleet-k8s");
    let files = fleet::k8s_manifests();
    assert_eq!(files.len(), 3, "{files:?}");

    // The Kubernetes schemas (kubernetes-validate ships them: no network).
    let validate = fleet::venv_tool("kubernetes-validate");
    for v in fleet::K8S_VERSIONS {
        let mut c = std::process::Command::new(&validate);
        c.args(["--strict", "--kubernetes-version", v]).args(&files);
        let r = fleet::run_bounded(
            &mut c,
            &dir.path,
            "kubernetes-validate",
            Duration::from_secs(60),
        );
        let out = format!("{}{}", r.stdout, r.stderr);
        assert_eq!(r.code(), 0, "Kubernetes {v}:\n{out}");
        assert_eq!(
            out.matches(" passed for resource ").count(),
            3,
            "Kubernetes {v}:\n{out}"
        );
        assert!(
            !out.contains("WARN") && !out.contains("ERROR"),
            "Kubernetes {v}:\n{out}"
        );
    }

    let m = fleet::k8s_commands(&dir.path, &files);
    // The release marker in the ConfigMap is one the sidecar accepts.
    let marker = m["configmaps"]["myapp-release"]["release"]
        .as_str()
        .expect("the marker");
    let marker_file = dir.join("marker");
    std::fs::write(&marker_file, marker).unwrap();
    let mut c = std::process::Command::new(fleet::sidecar_bin());
    c.arg("check-marker").arg(&marker_file);
    let r = fleet::run_bounded(&mut c, &dir.path, "check-marker", Duration::from_secs(30));
    assert_eq!(r.code(), 0, "{}", r.stdout);
    assert!(
        r.stdout.starts_with("release 2.4.1 sha256 "),
        "{}",
        r.stdout
    );

    // Every command line the pod runs parses with the program it names:
    // baton-sidecar (watch, its two probes), baton run, and the app's
    // (the library-mode demo server stands for myapp).
    let mut checked = Vec::new();
    for cmd in m["commands"].as_array().expect("commands") {
        let where_ = cmd["where"].as_str().unwrap_or_default();
        let argv: Vec<String> = serde_json::from_value(cmd["argv"].clone()).unwrap();
        let mut parts = vec![argv.clone()];
        if let Some(i) = argv.iter().position(|a| a == "--") {
            parts = vec![argv[..i].to_vec(), argv[i + 1..].to_vec()];
        }
        for part in parts {
            let program = match part[0].as_str() {
                "/usr/local/bin/baton-sidecar" => fleet::sidecar_bin(),
                "/usr/local/bin/baton" => apps::baton_bin(),
                "/app/current/myapp" => FIXTURE.into(),
                other => panic!("{where_}: unknown program {other}"),
            };
            let args = with_help(&part[1..]);
            let mut c = std::process::Command::new(&program);
            c.args(&args);
            let r = fleet::run_bounded(&mut c, &dir.path, "command", Duration::from_secs(30));
            assert_eq!(
                r.code(),
                0,
                "{where_}: {} {args:?} does not parse:\n{}",
                part[0],
                r.stderr
            );
            checked.push(format!("{where_}: {}", part[..2.min(part.len())].join(" ")));
        }
    }
    checked.sort();
    assert_eq!(
        checked,
        [
            "Deployment/myapp/myapp: /app/current/myapp --listen=http=0.0.0.0:8080",
            "Deployment/myapp/myapp: /usr/local/bin/baton run",
            "Deployment/myapp/release/livenessProbe: /usr/local/bin/baton-sidecar probe",
            "Deployment/myapp/release/startupProbe: /usr/local/bin/baton-sidecar probe",
            "Deployment/myapp/release: /usr/local/bin/baton-sidecar watch",
        ]
    );
}
