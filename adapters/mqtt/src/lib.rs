//! meshgate-mqtt
#![allow(dead_code)]
pub mod binding;
pub mod codec;
