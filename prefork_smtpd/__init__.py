"""prefork-smtpd: a prefork SMTP server with durable Maildir delivery."""

__version__ = "0.1.0"
