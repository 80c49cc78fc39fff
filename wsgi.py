"""WSGI entry point: ``gunicorn -c ops/gunicorn.conf.py wsgi:app``."""

from flagsvc import create_app

app = create_app()
