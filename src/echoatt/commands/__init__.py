"""One module per `echoatt` command: each function takes its config, writes into `config.out`, and returns what it
made. `echoatt.cli` maps command names to them."""
