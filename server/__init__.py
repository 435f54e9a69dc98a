"""The HTTP server (serve.py starts it): app.py assembles it; generate.py, chat.py and meta.py
are the endpoint families; protocol.py declares what they accept and answer; runner.py runs one
generation for all of them; errors.py is the error catalogue; settings.py the flags."""
