//! An axum `Router` served through baton-http: upgrades in place with idle
//! keep-alive connections handed over.
//!
//! ```sh
//! cargo run -p baton-http --example axum -- 127.0.0.1:3000 /tmp/axum.pid
//! curl http://127.0.0.1:3000/            # hello from pid N, generation 1
//! kill -USR2 $(cat /tmp/axum.pid)        # upgrade
//! ```

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use baton::{Baton, Config, ListenAddr};
use baton_http::{ConnInfo, Server, TowerToHyperService};

#[derive(Clone)]
struct App {
    generation: u64,
}

async fn hello(State(app): State<App>, info: Option<axum::Extension<ConnInfo>>) -> String {
    let handed = info.is_some_and(|i| i.handed_over);
    format!(
        "hello from axum pid {} generation {} handed_over {handed}\n",
        std::process::id(),
        app.generation
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: ListenAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:3000".into())
        .parse()?;
    let mut config = Config::default();
    config.pid_file = args.next().map(Into::into);
    let baton = Baton::start(config).await?;
    let listener = baton.listen("http", &addr)?;

    let router = Router::new().route("/", get(hello)).with_state(App {
        generation: baton.generation(),
    });
    // An axum Router is a tower Service; baton-http takes hyper services.
    let server = Server::new(&baton, TowerToHyperService::new(router));
    server.serve(listener);

    baton.ready().await?;
    baton.done().await;
    Ok(())
}
