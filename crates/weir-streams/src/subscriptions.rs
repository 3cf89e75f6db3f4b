//! Subscriptions in the database. (Being written.)
