"""The application: settings resolved once, the application object (store, towers, decoders),
and the two shells over it, the command line (`cli`) and the web app (`web`)."""
