"""Example Parsl configurations: copy one, change TICKET, PARTITION and ACCOUNT, and run."""
