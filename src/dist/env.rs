//! The launch environment: torchrun's variables, parsed with errors that name the variable.

use crate::error::VidError;

/// Where this process sits in a distributed launch, as torchrun describes it in the
/// environment: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` (and
/// `TORCHELASTIC_USE_AGENT_STORE`, set by torchrun when its agent serves the rendezvous
/// store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// The number of processes.
    pub world_size: usize,
    /// The rank among the processes of this machine (the CUDA device to use).
    pub local_rank: usize,
    /// The host of the rendezvous store.
    pub master_addr: String,
    /// The port of the rendezvous store.
    pub master_port: u16,
    /// Whether torchrun's agent serves the store (every rank is then a client); otherwise
    /// rank 0 serves it.
    pub agent_store: bool,
}

impl LaunchEnv {
    /// Reads the process environment. `Ok(None)` when none of `RANK`, `WORLD_SIZE`,
    /// `LOCAL_RANK` is set (a plain, single-process run); an error naming the variable when
    /// the launch variables are incomplete, not numbers, or inconsistent (`RANK >=
    /// WORLD_SIZE`).
    pub fn from_env() -> Result<Option<LaunchEnv>, VidError> {
        Self::from_lookup(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// [`LaunchEnv::from_env`] over any source of variables (`lookup(name)` gives a value).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<LaunchEnv>, VidError> {
        if ["RANK", "WORLD_SIZE", "LOCAL_RANK"]
            .iter()
            .all(|v| lookup(v).is_none())
        {
            return Ok(None);
        }
        let bad = |var: &'static str, message: String| VidError::Environment { var, message };
        let required = |var: &'static str| {
            lookup(var).ok_or_else(|| {
                bad(
                    var,
                    "not set (a distributed launch sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR \
                     and MASTER_PORT, as torchrun does)"
                        .into(),
                )
            })
        };
        let number = |var: &'static str, text: String| {
            text.trim()
                .parse::<usize>()
                .map_err(|_| bad(var, format!("{text:?} is not a non-negative integer")))
        };
        let world_size = number("WORLD_SIZE", required("WORLD_SIZE")?)?;
        if world_size == 0 {
            return Err(bad("WORLD_SIZE", "must be at least 1, found 0".into()));
        }
        let rank = number("RANK", required("RANK")?)?;
        if rank >= world_size {
            return Err(bad(
                "RANK",
                format!("{rank} is not below WORLD_SIZE ({world_size})"),
            ));
        }
        let local_rank = match lookup("LOCAL_RANK") {
            Some(text) => number("LOCAL_RANK", text)?,
            None => rank,
        };
        if local_rank >= world_size {
            return Err(bad(
                "LOCAL_RANK",
                format!("{local_rank} is not below WORLD_SIZE ({world_size})"),
            ));
        }
        let master_addr = required("MASTER_ADDR")?.trim().to_string();
        if master_addr.is_empty() {
            return Err(bad("MASTER_ADDR", "is empty".into()));
        }
        let port_text = required("MASTER_PORT")?;
        let master_port = match port_text.trim().parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(bad(
                    "MASTER_PORT",
                    format!("{port_text:?} is not a port number (1..=65535)"),
                ))
            }
        };
        let agent_store = lookup("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True");
        Ok(Some(LaunchEnv {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
            agent_store,
        }))
    }
}
