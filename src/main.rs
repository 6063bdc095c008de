use ringnbd::cli::{Cli, Command, LoadError, ctl};
use ringnbd::export::{Source, open_entries};
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
    let cli = match Cli::load() {
        Ok(cli) => cli,
        Err(LoadError::Usage(message) | LoadError::Config(message)) => {
            ringnbd::note!("{message}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Some(Command::Ctl(args)) = &cli.command {
        return ctl::run(args);
    }
    ringnbd::log::init(cli.log_format);
    if let Err(message) = cli.validate() {
        ringnbd::note!("{message}");
        return std::process::ExitCode::from(2);
    }
    if cli.check_config {
        return check_config(&cli);
    }
    match faults::install_from_env() {
        Ok(Some(plan)) => ringnbd::note!("WARNING: test fault injection is on ({}={plan})", faults::ENV),
        Ok(None) => {}
        Err(message) => {
            ringnbd::note!("{message}");
            return std::process::ExitCode::from(2);
        }
    }
    let exports = match open_entries(&cli.export_entries(), &cli.export_options()) {
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

/// `--check-config`: what would be served, checked without opening
/// anything (a layered export's top would be created): each file named
/// must exist.
fn check_config(cli: &Cli) -> std::process::ExitCode {
    let entries = cli.export_entries();
    let mut problems = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for entry in &entries {
        let paths: Vec<&std::path::Path> = match &entry.spec.source {
            Source::File(path) => vec![path],
            Source::Memory(_) => vec![],
            Source::Layers(layers) => layers.lowers.iter().map(|p| p.as_path()).collect(),
        };
        for path in paths {
            if let Err(e) = std::fs::metadata(path) {
                problems.push(format!("{}: {e}", path.display()));
            }
        }
        if let Some(name) = &entry.spec.name {
            if names.contains(name) {
                problems.push(format!("export {name:?} is named twice (config and command line)"));
            }
            names.push(name.clone());
        }
    }
    let origin = cli.config.as_ref().map_or("the command line".to_owned(), |p| p.display().to_string());
    if !problems.is_empty() {
        for problem in &problems {
            ringnbd::note!("{origin}: {problem}");
        }
        return std::process::ExitCode::from(2);
    }
    println!("{origin}: OK, {} export(s)", entries.len());
    for entry in &entries {
        let name = entry.spec.name.as_deref().unwrap_or("(named after its file)");
        println!("  {name:?}: {:?}", entry.spec.source);
    }
    std::process::ExitCode::SUCCESS
}
