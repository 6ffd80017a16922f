"""What a finished run shows besides its numbers: plots of the final evaluation, and the
comparison of an experiment's runs (`jobs.compare`)."""
