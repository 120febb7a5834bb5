"""Per-channel calibration: manipulator µm <-> microscope µm <-> pixels, assignment, correction."""
