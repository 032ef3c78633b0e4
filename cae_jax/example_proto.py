"""`tf.train.Example`, the record `cae-jax prepare` writes, as a protobuf class built here from
its schema (TensorFlow's feature.proto and example.proto), so that reading prepared data
does not import TensorFlow: that costs every training process and input worker seconds, and
on hosts with the GPU build of TensorFlow it would also claim the accelerator."""

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_Field = descriptor_pb2.FieldDescriptorProto


def _field(name: str, number: int, kind: int, label: int = _Field.LABEL_OPTIONAL,
           **options) -> _Field:
    return _Field(name=name, number=number, type=kind, label=label, **options)


def _list(name: str, kind: int) -> descriptor_pb2.DescriptorProto:
    return descriptor_pb2.DescriptorProto(
        name=name, field=[_field("value", 1, kind, _Field.LABEL_REPEATED)])


def _schema() -> descriptor_pb2.FileDescriptorProto:
    feature = descriptor_pb2.DescriptorProto(
        name="Feature", oneof_decl=[descriptor_pb2.OneofDescriptorProto(name="kind")],
        field=[_field(name, number, _Field.TYPE_MESSAGE, type_name=f".tensorflow.{kind}",
                      oneof_index=0)
               for name, number, kind in (("bytes_list", 1, "BytesList"),
                                          ("float_list", 2, "FloatList"),
                                          ("int64_list", 3, "Int64List"))])
    entry = descriptor_pb2.DescriptorProto(
        name="FeatureEntry", options=descriptor_pb2.MessageOptions(map_entry=True),
        field=[_field("key", 1, _Field.TYPE_STRING),
               _field("value", 2, _Field.TYPE_MESSAGE, type_name=".tensorflow.Feature")])
    features = descriptor_pb2.DescriptorProto(
        name="Features", nested_type=[entry],
        field=[_field("feature", 1, _Field.TYPE_MESSAGE, _Field.LABEL_REPEATED,
                      type_name=".tensorflow.Features.FeatureEntry")])
    example = descriptor_pb2.DescriptorProto(
        name="Example",
        field=[_field("features", 1, _Field.TYPE_MESSAGE, type_name=".tensorflow.Features")])
    return descriptor_pb2.FileDescriptorProto(
        name="cae_jax/example.proto", package="tensorflow", syntax="proto3",
        message_type=[_list("BytesList", _Field.TYPE_BYTES), _list("FloatList", _Field.TYPE_FLOAT),
                      _list("Int64List", _Field.TYPE_INT64), feature, features, example])


# A pool of its own: TensorFlow's classes of the same names may be loaded beside these.
_pool = descriptor_pool.DescriptorPool()
_pool.Add(_schema())
Example = message_factory.GetMessageClass(_pool.FindMessageTypeByName("tensorflow.Example"))
