//! Start-up of a generation: the handoff channel inherited from the
//! previous generation (or systemd's listeners), the `SIGUSR2` handler and
//! the control socket — all before the application can announce readiness.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::config::{Config, ListenAddr};
use crate::control::{self, Command, UpgradeOptions};
use crate::error::Error;
use crate::generation::Baton;
use crate::handoff::recv::NewSide;
use crate::inner::{AtomicCounters, ExecPlan, Inner, unix_ms};
use crate::lifecycle::{Activity, Lifecycle};
use crate::listeners::{Listener, Origin, Registry};
use crate::notify::Notifier;
use crate::spawn::{ENV_HANDOFF_FD, ENV_PARENT_PID, OsSpawner, Spawner};
use baton_sys as sys;

/// Name of the internal listener carrying the control socket.
pub(crate) const CONTROL_LISTENER: &str = "baton.control";

impl Baton {
    /// Start baton in this process, with the real process spawner.
    ///
    /// In a new generation (started by an upgrade) this receives the
    /// listening sockets from the old generation; otherwise it adopts
    /// systemd's `LISTEN_FDS` if they are meant for this pid. It installs the
    /// `SIGUSR2` handler (before anything can announce readiness) and opens
    /// the control socket if configured. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// A broken handoff channel, unusable inherited sockets, or a control
    /// socket that cannot be created.
    pub async fn start(config: Config) -> Result<Baton, Error> {
        Self::start_with_spawner(config, Arc::new(OsSpawner)).await
    }

    /// [`start`](Baton::start) with another [`Spawner`] (tests).
    ///
    /// # Errors
    /// As [`start`](Baton::start).
    pub async fn start_with_spawner(
        config: Config,
        spawner: Arc<dyn Spawner>,
    ) -> Result<Baton, Error> {
        match sys::process::raise_nofile_limit() {
            Ok(n) => tracing::debug!(
                nofile = n,
                "raised RLIMIT_NOFILE soft limit to the hard limit"
            ),
            Err(e) => tracing::warn!(error = %e, "could not raise RLIMIT_NOFILE"),
        }
        let mut argv = std::env::args_os();
        let arg0 = argv.next().unwrap_or_else(|| OsString::from("server"));
        let args: Vec<OsString> = argv.collect();
        let program = match &config.executable {
            Some(p) => p.clone(),
            None => crate::spawn::resolve_executable(Some(&arg0))
                .map_err(|e| Error::io("finding this program's executable", e))?,
        };
        let exec = ExecPlan {
            program,
            arg0,
            args,
        };
        let pid = sys::process::getpid();
        let registry = Registry::new(config.backlog);

        let mut generation = 1;
        let mut predecessor = None;
        let mut predecessor_pid = None;
        crate::trace::step("new: Baton::start");
        if let Some(fd) = inherited_handoff_fd()? {
            config.run_hook(crate::config::HandoffPoint::Started);
            let app_version = config.app_version.clone();
            let (side, listeners) = NewSide::connect(fd, |peer| {
                crate::handoff::send::hello(&app_version, peer.generation + 1)
            })
            .await?;
            generation = side.peer.generation + 1;
            predecessor_pid = Some(side.peer.pid);
            tracing::info!(
                generation,
                pid,
                previous_pid = side.peer.pid,
                previous_version = %side.peer.app_version,
                listeners = listeners.len(),
                "new generation received the listeners of the previous one"
            );
            for (meta, fd) in listeners {
                registry.add_inherited(&meta.name, Some(meta.kind), fd, Origin::Predecessor)?;
            }
            crate::trace::step("new: listeners registered");
            config.run_hook(crate::config::HandoffPoint::ListenersReceived);
            predecessor = Some(side);
        } else {
            adopt_systemd_listeners(&registry)?;
        }

        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
        let notifier = if config.systemd_notify {
            Notifier::from_env()
        } else {
            None
        };
        let inner = Arc::new(Inner {
            generation,
            pid,
            started: Instant::now(),
            exec,
            registry,
            life: Lifecycle::new(),
            cmd_tx,
            spawner,
            notifier,
            predecessor_alive: watch::Sender::new(predecessor.is_some()),
            predecessor: tokio::sync::Mutex::new(predecessor),
            predecessor_pid,
            handoff_tx: Mutex::new(None),
            incoming_tx: Mutex::new(Some(incoming_tx)),
            incoming_rx: Mutex::new(Some(incoming_rx)),
            incoming_taken: AtomicBool::new(false),
            owned_sinks: Mutex::new(Some(Vec::new())),
            owned_sinks_live: Mutex::new(Vec::new()),
            owned_out: Mutex::new(None),
            closers: Arc::default(),
            exporters: Mutex::new(Vec::new()),
            imported: tokio::sync::Mutex::new(None),
            last_upgrade: Mutex::new(None),
            counters: AtomicCounters::default(),
            activity: Arc::new(Activity::default()),
            quiesced_at: Mutex::new(None),
            control_tasks: TaskTracker::new(),
            notes: Mutex::new(Vec::new()),
            successor_pid: Mutex::new(None),
            started_unix_secs: unix_ms() / 1000,
            histograms: crate::carry::Histograms::default(),
            app_counters: Mutex::new(Vec::new()),
            pending_carry: crate::carry::Pending::default(),
            config,
        });
        tokio::spawn(crate::upgrade::owner(Arc::clone(&inner), cmd_rx));
        let baton = Baton { inner };
        if baton.inner.config.upgrade_on_sigusr2 {
            baton.install_sigusr2()?;
        }
        if let Some(path) = baton.inner.config.control_socket.clone() {
            baton.open_control_socket(&path)?;
        }
        Ok(baton)
    }

    fn install_sigusr2(&self) -> Result<(), Error> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sig = signal(SignalKind::user_defined2())
            .map_err(|e| Error::io("installing the SIGUSR2 handler", e))?;
        let tx = self.inner.cmd_tx.clone();
        tokio::spawn(async move {
            while sig.recv().await.is_some() {
                crate::trace::step("old: SIGUSR2 received");
                tracing::info!("SIGUSR2 received: upgrade requested");
                let (etx, _erx) = mpsc::unbounded_channel();
                let (rtx, rrx) = oneshot::channel();
                if tx
                    .send(Command::Upgrade {
                        opts: UpgradeOptions::default(),
                        events: etx,
                        reply: rtx,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::spawn(async move {
                    match rrx.await {
                        Ok(Ok(_)) | Err(_) => {}
                        Ok(Err(f)) => {
                            tracing::warn!(reason = %f.message, "SIGUSR2 upgrade did not happen")
                        }
                    }
                });
            }
        });
        Ok(())
    }

    fn open_control_socket(&self, path: &Path) -> Result<(), Error> {
        control::prepare_dir(path)?;
        let (kind, fd, origin) = self.inner.registry.take_or_bind(
            CONTROL_LISTENER,
            &ListenAddr::Unix(path.to_path_buf()),
            Some(0o600),
            false,
        )?;
        let listener = Listener::new(CONTROL_LISTENER, kind, fd, self.inner.life.gate())?;
        tracing::debug!(path = %path.display(), origin = origin.as_str(), "control socket");
        let tx = self.inner.cmd_tx.clone();
        let tasks = self.inner.control_tasks.clone();
        tokio::spawn(async move {
            while let Some(res) = listener.accept().await {
                match res {
                    Ok((crate::listeners::Stream::Unix(s), _)) => {
                        tasks.spawn(control::serve_connection(s, tx.clone()));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(())
    }
}

fn inherited_handoff_fd() -> Result<Option<std::os::fd::OwnedFd>, Error> {
    let Some(v) = std::env::var_os(ENV_HANDOFF_FD) else {
        return Ok(None);
    };
    let parent_ok = std::env::var(ENV_PARENT_PID)
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == sys::process::getppid());
    if !parent_ok {
        tracing::warn!(
            "{ENV_HANDOFF_FD} is set but {ENV_PARENT_PID} is not our parent: \
             ignoring a handoff environment inherited by accident"
        );
        return Ok(None);
    }
    let raw: RawFd = v
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Protocol(format!("{ENV_HANDOFF_FD}={v:?} is not an fd number")))?;
    let fd = sys::inherit::adopt_handoff_channel(raw)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidInput => Error::Protocol(e.to_string()),
            _ => Error::io(format!("adopting the handoff channel fd {raw}"), e),
        })?
        .ok_or_else(|| {
            Error::Protocol(format!(
                "{ENV_HANDOFF_FD}={raw} but nothing is open at fd {raw}"
            ))
        })?;
    Ok(Some(fd))
}

/// Adopt systemd socket-activation fds (`LISTEN_FDS`) meant for this pid.
fn adopt_systemd_listeners(registry: &Registry) -> Result<(), Error> {
    let Some(passed) = crate::listeners::ListenFds::from_env() else {
        return Ok(());
    };
    for p in passed.adopt() {
        let (raw, name) = (p.raw, p.name.as_deref().unwrap_or("unknown"));
        match p.socket {
            Ok(Some((fd, _))) => registry.add_inherited(name, None, fd, Origin::Systemd)?,
            Ok(None) => tracing::warn!(fd = raw, "LISTEN_FDS names fd {raw} but it is not open"),
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "fd {raw} named by LISTEN_FDS is not a listening socket (was it passed close-on-exec?)"
                    ),
                    e,
                ));
            }
        }
    }
    tracing::info!(
        count = passed.count(),
        "adopted systemd socket-activation listeners"
    );
    Ok(())
}
