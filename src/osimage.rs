//! osimage
