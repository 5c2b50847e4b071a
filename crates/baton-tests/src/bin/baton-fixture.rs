//! The fixture server (see `baton_tests::fixture`).
fn main() -> std::process::ExitCode {
    baton_tests::fixture::main(baton_demo::VERSION)
}
