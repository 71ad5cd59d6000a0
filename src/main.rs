#![warn(clippy::too_many_lines)]

fn main() -> std::process::ExitCode {
    redline_agent::cli::main()
}
