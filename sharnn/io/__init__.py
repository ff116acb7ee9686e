"""Model I/O: loading and saving models, run directories, the Hub, the reference's pickles, atomic writes,
the run lock, signals."""
