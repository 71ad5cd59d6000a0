fn main() -> std::process::ExitCode {
    redline_agent::cli::main()
}
