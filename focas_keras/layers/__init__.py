"""Custom Keras layers (registered serializable under the package name ``focas_keras``)."""
