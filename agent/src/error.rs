//! Errors at the agent's API boundary carry a kind (palisade_api::ErrorKind)
//! that tells the caller what to do: the CNI plugin turns it into the CNI
//! spec's code, so only a transient agent problem becomes "try again later".
use palisade_api::ErrorKind;

/// An error whose kind is known where it is raised (validation, conflicts,
/// the owner being unavailable).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
}

/// An `anyhow::Error` of the given kind.
pub fn refuse(kind: ErrorKind, message: impl Into<String>) -> anyhow::Error {
    Refusal {
        kind,
        message: message.into(),
    }
    .into()
}

/// The kind of an error: the first cause in its chain that has one; errors
/// nobody classified are `Internal` (they will not fix themselves).
pub fn kind_of(e: &anyhow::Error) -> ErrorKind {
    for cause in e.chain() {
        if let Some(r) = cause.downcast_ref::<Refusal>() {
            return r.kind;
        }
        if let Some(d) = cause.downcast_ref::<palisade_dataplane::Error>() {
            match d {
                palisade_dataplane::Error::MapFull { .. } => return ErrorKind::MapFull,
                palisade_dataplane::Error::NoSuchInterface(_) => return ErrorKind::NotFound,
                _ => {}
            }
        }
    }
    ErrorKind::Internal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_is_found_anywhere_in_the_chain() {
        let e = refuse(ErrorKind::Conflict, "address taken").context("registering x/y");
        assert_eq!(kind_of(&e), ErrorKind::Conflict);
        let e = anyhow::Error::new(palisade_dataplane::Error::NoSuchInterface("veth1".into()))
            .context("host interface veth1 of x/y");
        assert_eq!(kind_of(&e), ErrorKind::NotFound);
        let e = anyhow::Error::new(palisade_dataplane::Error::MapFull {
            name: "POLICY",
            entries: 10,
        })
        .context("syncing");
        assert_eq!(kind_of(&e), ErrorKind::MapFull);
        assert_eq!(kind_of(&anyhow::anyhow!("a bug")), ErrorKind::Internal);
    }
}
