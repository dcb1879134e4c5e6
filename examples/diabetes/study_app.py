"""The study's Flower app: more-fl's aggregator and site agent, rooted at this folder
(where `experiment.yaml` and the task files are)."""

from pathlib import Path

from aggregator.server_app import create_app as create_server_app
from sites.client_app import create_app as create_client_app

HERE = Path(__file__).resolve().parent
server = create_server_app(HERE)
client = create_client_app(HERE)
