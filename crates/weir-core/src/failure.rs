//! How a failure is told in one line: a caught panic's message, and an error with its causes.
//!
//! Errors here keep their cause as `source()` and never repeat it in their own message (so the
//! CLI's `{:#}` prints each cause once). A log line or a stored error text that must carry the
//! whole story renders it with [`Chain`]: `outer: cause: root cause`.

use std::any::Any;
use std::fmt;

/// A boxed error from user code (an operator's, a worker's).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Displays an error followed by each of its sources, separated by `: `.
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

/// The panic's message when it was a string (as `panic!` makes it), else `unknown panic`.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_formatted_messages() {
        let p = std::panic::catch_unwind(|| panic!("boom")).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "boom");
        let p = std::panic::catch_unwind(|| panic!("boom {}", 7)).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "boom 7");
        let p = std::panic::catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "unknown panic");
    }

    #[test]
    fn a_chain_names_every_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read weir.toml")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("permission denied"));
        assert_eq!(Chain(&e).to_string(), "cannot read weir.toml: permission denied");
    }
}
