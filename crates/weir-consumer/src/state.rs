//! The states of consumers and lanes, and what became of a failed attempt: enums in Rust,
//! lowercase text in the database and in JSON (`weir status --json`, `/v1/consumers`).
//!
//! ```text
//! consumer:  running ──(retries exhausted, on_exhausted = halt)──► halted
//!            halted ──(weir resume | weir skip)──► running
//!            running | halted ──(stop, or a handler's OperatorError::stop)──► stopped
//!            stopped ──(start)──► running
//!
//! lane:      idle ◄──► running ──(handler failed)──► retrying ──(succeeded)──► running
//!                                                   retrying ──(exhausted, halt)──► halted
//!            every lane of a halted consumer reads as halted
//!
//! failure (weir.consumer_failures.outcome): retry | halt | skip | park | stop
//! ```
//!
//! The full state machine is drawn in `docs/consumers.md`.

/// Declares a unit enum stored as lowercase text: `as_str`, `FromStr`, `Display`, serde,
/// utoipa and sqlx (as `text`) all agree on the same words.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
        #[serde(rename_all = "lowercase")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// The word stored in the database and shown in JSON.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(UnknownState { what: stringify!($name), text: other.to_string() }),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                // `pad`, not `write_str`: `{:<8}` in `weir status` aligns the columns.
                f.pad(self.as_str())
            }
        }

        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                Ok(<&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?.parse()?)
            }
        }
    };
}

text_enum! {
    /// A consumer's state (`weir.consumers.state`).
    ConsumerState {
        /// Handling events.
        Running => "running",
        /// Stopped at an event whose retries ran out; waits for `weir resume` or `weir skip`.
        Halted => "halted",
        /// Stopped on request (`weir subscriptions stop`); its checkpoints stay until started.
        Stopped => "stopped",
    }
}

text_enum! {
    /// What a consumer is (`weir.consumers.kind`).
    ConsumerKind {
        /// Declared by the process that runs it (Rust or `[[operators]]`).
        Operator => "operator",
        /// Kept in the database (`weir.subscriptions`), created from any surface.
        Subscription => "subscription",
    }
}

text_enum! {
    /// A lane's state (`weir.checkpoints.status`; `halted` for every lane of a halted consumer).
    LaneState {
        /// Handling events.
        Running => "running",
        /// Waiting to try a failed event again.
        Retrying => "retrying",
        /// Caught up with the log (or not held by any process).
        Idle => "idle",
        /// Its consumer is halted.
        Halted => "halted",
        /// Its consumer is stopped, or it has reached the position of a re-split in progress.
        Stopped => "stopped",
    }
}

text_enum! {
    /// What became of a failed attempt (`weir.consumer_failures.outcome`).
    Outcome {
        /// It will be tried again.
        Retry => "retry",
        /// The consumer halted on it.
        Halt => "halt",
        /// It was skipped: the checkpoint moved past it without its effect.
        Skip => "skip",
        /// It was parked: set aside with its key's later events, until retried or discarded.
        Park => "park",
        /// The handler stopped the consumer (a receiver that is gone); starting it tries again.
        Stop => "stop",
    }
}

/// A word that names no state (a database row written by a newer weir, or a typo).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a {what}")]
pub struct UnknownState {
    what: &'static str,
    text: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_through_text_and_json() {
        for s in [LaneState::Running, LaneState::Retrying, LaneState::Idle, LaneState::Halted] {
            assert_eq!(s.as_str().parse::<LaneState>(), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), serde_json::json!(s.as_str()));
        }
        assert_eq!(ConsumerState::Halted.to_string(), "halted");
        assert_eq!(format!("{:<8}|", LaneState::Idle), "idle    |");
        assert_eq!("park".parse::<Outcome>(), Ok(Outcome::Park));
        assert!("parked".parse::<Outcome>().is_err());
    }
}
