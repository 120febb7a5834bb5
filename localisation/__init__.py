"""Pipette-tip localisation: the paper's GAN + coarse-to-fine model, baselines, training, tools."""
