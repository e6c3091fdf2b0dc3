"""What both services share: the records and their wire form, config loading, Kafka connection
settings, metrics, logging, validation, the alarm engine, the HTTP server and the stage contracts
(stage.py)."""
