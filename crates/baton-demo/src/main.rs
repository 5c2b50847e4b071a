//! `baton-demo`: see `baton-demo --help`.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    baton_demo::main_with(baton_demo::Custom::default())
}
