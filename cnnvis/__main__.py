from cnnvis.cli import app

app(prog_name="cnnvis")
