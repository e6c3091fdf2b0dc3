"""Sources: each turns probe, broker or device data into readings and hands them to the intake
(``common/stage.py``'s Sink). A new source goes here as a module or package."""
