"""The demo world: a tiny text-to-image domain Tandem trains and ships its own models for."""
