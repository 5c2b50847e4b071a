//! The fixture server built with another version string, to replace the
//! binary on disk in tests.
fn main() -> std::process::ExitCode {
    baton_tests::fixture::main("2.0.0-fixture")
}
