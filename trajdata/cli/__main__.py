from trajdata.cli.main import cli

cli(prog_name="trajdata")
