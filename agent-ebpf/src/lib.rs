#![no_std]
// This file exists so that `latch` can declare a build-dependency on this crate (see agent/build.rs).
