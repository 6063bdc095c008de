use clap::Parser;

use ringnbd::cli::{Cli, Command, ctl};
use ringnbd::export::open_all;
use ringnbd::faults;
use ringnbd::net::activation::ListenEnv;
use ringnbd::server::serve;

/// A panic anywhere ends the process: a worker that died would leave its
/// connections hanging while dispatch kept choosing it, so the only safe
/// outcome is a loud exit a supervisor can restart from.
fn abort_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        ringnbd::note!("fatal: thread {name} panicked; aborting the server");
        default_hook(info);
        std::process::abort();
    }));
}

fn main() -> std::process::ExitCode {
    // First, while this is the only thread: the variables are removed from
    // the environment so nothing started later takes the sockets as its own.
    // SAFETY: no other thread exists yet.
    let activation = unsafe { ListenEnv::take() };
    abort_on_panic();
    let cli = Cli::parse();
    if let Some(Command::Ctl(args)) = &cli.command {
        return ctl::run(args);
    }
    ringnbd::log::init(cli.log_format);
    if let Err(message) = cli.validate() {
        ringnbd::note!("{message}");
        return std::process::ExitCode::from(2);
    }
    match faults::install_from_env() {
        Ok(Some(plan)) => ringnbd::note!("WARNING: test fault injection is on ({}={plan})", faults::ENV),
        Ok(None) => {}
        Err(message) => {
            ringnbd::note!("{message}");
            return std::process::ExitCode::from(2);
        }
    }
    let exports = match open_all(&cli.export_specs(), &cli.export_options()) {
        Ok(exports) => exports,
        Err(e) => {
            ringnbd::note!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut config = cli.server_config();
    config.process.activation = activation;
    match serve(config, exports) {
        Ok(served) => served.command_status.map_or(std::process::ExitCode::SUCCESS, std::process::ExitCode::from),
        Err(e) => {
            ringnbd::note!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}
