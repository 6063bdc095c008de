use clap::Parser;

use ringnbd::cli::Cli;
use ringnbd::export::open_all;
use ringnbd::server::serve;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let exports = match open_all(&cli.export_specs(), &cli.export_options()) {
        Ok(exports) => exports,
        Err(e) => {
            eprintln!("ringnbd: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match serve(cli.server_config(), exports) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringnbd: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
